"""gemmtune.autotune"""
