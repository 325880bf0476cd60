"""gemmtune.runtime: use tuned kernel configs in a torch model.

    from gemmtune.runtime import patch
    patch(model)            # GPTQ / AWQ layers -> QuantLinear, configs looked up per device + shape
    model.cuda()            # prepares every layer: config lookup, kernels compiled, once
    describe(model).memory()  # what the quantized weights hold on the GPU against their packed size

Sibling projections that read one input (q/k/v, gate/up of Llama, Mistral, Qwen2, ...) run as
one GEMM over their concatenated columns (`fuse=False` to opt out; runtime/fusion.py); the module
tree and state dict stay the checkpoint's. A prepared layer keeps one copy of its weight on the GPU (the kernel layout); its GPTQ tensors
are rebuilt from it for `state_dict()` and moves. `load_quantized(model, path, device="cuda")`
and `patch(model, device="cuda")` go one layer at a time, and fill a model built on `meta`.

Config resolution (`lookup`): explicit argument > GEMMTUNE_PROFILE > database (GEMMTUNE_DB or
the default path) > the built-in default; GEMMTUNE_DISABLE=1 forces defaults. Imports only
gemmtune.kernels and gemmtune.db; CuPy is touched only when a layer is prepared on CUDA.
"""

from __future__ import annotations

if __name__ != "gemmtune.runtime":  # imported as top-level `runtime`: not ours to answer
    from gemmtune._toplevel import hand_over

    hand_over(__name__, __file__)
else:
    from gemmtune.kernels.formats import QuantFormat, read_format

    from .fusion import FusedGroup, Fusion, fuse_projections, launched_problems
    from .lookup import (
        DB_ENV,
        DISABLE_ENV,
        PROFILE_ENV,
        GemmtuneWarning,
        LookupResult,
        clear_cache,
        lookup,
        lookup_split,
    )
    from .patch import PatchedLayer, PatchReport, describe, load_quantized, patch, quantize_model
    from .quant_linear import GPTQSpec, QuantLinear

    __all__ = [
        "DB_ENV",
        "DISABLE_ENV",
        "FusedGroup",
        "Fusion",
        "PROFILE_ENV",
        "GPTQSpec",
        "GemmtuneWarning",
        "LookupResult",
        "PatchReport",
        "PatchedLayer",
        "QuantFormat",
        "QuantLinear",
        "clear_cache",
        "describe",
        "fuse_projections",
        "launched_problems",
        "load_quantized",
        "lookup",
        "lookup_split",
        "patch",
        "quantize_model",
        "read_format",
    ]
