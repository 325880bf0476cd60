"""gemmtune.autotune"""

if __name__ != "gemmtune.autotune":  # imported as top-level `autotune`: not ours to answer
    from gemmtune._toplevel import hand_over

    hand_over(__name__, __file__)
