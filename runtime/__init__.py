"""gemmtune.runtime"""
