"""Layer shapes of real models: what `gemmtune tune --model llama-3-8b` actually tunes.

Why: a tuning result is only served to a layer whose shape it was tuned for, so the problems
tuned for a model must be the GEMMs that will run. Those depend on who runs the model, so the
*layout* is explicit:

- `transformers` (the default): the GEMMs `gemmtune.runtime.patch` / `load_quantized` run for
  the model as transformers builds it: its linears q_proj, k_proj, v_proj, o_proj, gate_proj,
  up_proj, down_proj, except that projections the architecture computes from one input are one
  GEMM over their concatenated columns (`q_proj+k_proj+v_proj`, `gate_proj+up_proj`) where the
  rule of `gemmtune.kernels.fusion` says the runtime fuses them: the config's `model_type` is
  an architecture known to share the input (Llama, Mistral, Qwen2, ...) and the quantization
  allows it (kernel bits; act-order checkpoints are assumed to share q/k/v's permutation, as
  GPTQ's one Hessian per input gives them; the runtime checks the tensors and reports any it
  runs separately). The runtime applies the same rule to the loaded modules, so the shapes
  tuned here are the shapes served. It is the default because the README's Quick start
  (`tune --model`, then `patch(model)`) is the default user.
- `separate`: every projection its own GEMM, what `patch(model, fuse=False)` runs (and any
  architecture the rule does not know).
- `fused`: engines that fuse projections (ExLlamaV2, vLLM: q/k/v into one `qkv` GEMM, gate and
  up into one `gate_up`) whatever the architecture, and the C header export for engines that
  compile the constants in.

Shapes come from built-in presets (published Hugging Face configs) or from a model's own
`config.json`, whose `quantization_config` (GPTQ or AWQ, read by `kernels.formats`, which
refuses what gemmtune cannot run) also supplies bits / group size / act-order.

Shapes (K = in_features, N = out_features, `W[K, N]`; attn = heads * head_dim,
kv = kv_heads * head_dim; `transformers` is `separate` with its fused groups merged):
  separate      q_proj    K = hidden, N = attn        fused  qkv      K = hidden, N = attn + 2 * kv
                k_proj    K = hidden, N = kv                 o        K = attn,   N = hidden
                v_proj    K = hidden, N = kv                 gate_up  K = hidden, N = 2 * intermediate
                o_proj    K = attn,   N = hidden             down     K = intermediate, N = hidden
                gate_proj K = hidden, N = intermediate
                up_proj   K = hidden, N = intermediate
                down_proj K = intermediate, N = hidden
Each runs once per decoder layer, so `Layer.count = num_hidden_layers`. Projections of one
shape (q and o of Llama-3-8B, k and v) stay separate `Layer`s; `unique_problems` (and the CLI)
tune such a shape once, with the counts summed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gemmtune.kernels.errors import InvalidProblemError
from gemmtune.kernels.formats import read_format
from gemmtune.kernels.fusion import fused_problem, projection_groups, why_not_fused
from gemmtune.kernels.problem import Problem


@dataclass(frozen=True)
class ModelSpec:
    """The config fields that decide a decoder's GEMM shapes (plus GPTQ settings if known)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    bits: int | None = None
    group_size: int | None = None
    act_order: bool | None = None
    quant_format: str | None = None
    """`QuantFormat.name` of the config's quantization_config ("gptq", "gptq_v2", "awq"), if any."""
    model_type: str | None = None
    """The config's transformers `model_type` ("llama", "qwen2", ...): which projections the
    runtime fuses (`gemmtune.kernels.fusion`)."""

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "num_hidden_layers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidProblemError(f"{self.name}: {field} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Layer:
    """One GEMM kind of a model: `count` of them run per forward pass."""

    name: str
    problem: Problem
    count: int


Layout = Literal["transformers", "separate", "fused"]
"""Which GEMMs a model's decoder layer runs: see the module docstring."""

LAYOUTS: dict[Layout, str] = {
    "transformers": "what gemmtune's patch / load_quantized run: the model's linears, q+k+v and "
                    "gate+up one GEMM each for Llama, Mistral, Qwen2, ...",
    "separate": "q, k, v, o, gate, up, down each alone, as patch(..., fuse=False) runs them",
    "fused": "qkv, o, gate_up, down, as engines that fuse projections run them (ExLlamaV2, "
             "vLLM; the C header export is for those)",
}
"""Every layout with what it is for, in the order `--help` and errors list them."""

DEFAULT_LAYOUT: Layout = "transformers"
"""What `gemmtune.runtime.patch` runs: the Quick start's `tune --model` then `patch(model)`."""


def parse_layout(text: str) -> Layout:
    """`text` as a layout (case and surrounding space ignored), else one clear error line."""
    key = text.strip().lower() if isinstance(text, str) else None
    if key not in LAYOUTS:
        raise InvalidProblemError(f"unknown layout {text!r}: choose {', '.join(LAYOUTS)}")
    return key  # type: ignore[return-value]


def layout_shapes(spec: ModelSpec, layout: Layout) -> list[tuple[str, int, int]]:
    """(name, K, N) of every linear of one decoder layer of `spec` in `layout`: the one place
    that says which projections a layout has and what shape each is. For `transformers` these
    are the model's linears; `spec_layers` merges the groups the fusion rule fuses (it needs
    the quantization, which the rule also asks about)."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    attn = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    match layout:
        case "transformers" | "separate":
            return [("q_proj", hidden, attn), ("k_proj", hidden, kv), ("v_proj", hidden, kv),
                    ("o_proj", attn, hidden), ("gate_proj", hidden, inter),
                    ("up_proj", hidden, inter), ("down_proj", inter, hidden)]
        case "fused":
            return [("qkv", hidden, attn + 2 * kv), ("o", attn, hidden),
                    ("gate_up", hidden, 2 * inter), ("down", inter, hidden)]
    raise InvalidProblemError(f"unknown layout {layout!r}")  # a Layout without its shapes here


def fuse_layers(layers: list[Layer], model_type: str | None) -> list[Layer]:
    """`layers` (one decoder layer's linears) with each group the fusion rule fuses for
    `model_type` (`gemmtune.kernels.fusion`, the runtime's rule) merged into one Layer named
    `q_proj+k_proj+v_proj` at its first member's place; groups the rule refuses stay apart."""
    by_name = {layer.name: layer for layer in layers}
    merged: dict[str, Layer] = {}
    gone: set[str] = set()
    for names in projection_groups(model_type):
        members = [by_name.get(n) for n in names]
        if any(m is None for m in members):
            continue
        problems = [m.problem for m in members]  # type: ignore[union-attr]
        if why_not_fused(problems) is None:
            merged[names[0]] = Layer("+".join(names), fused_problem(problems), members[0].count)  # type: ignore[union-attr]
            gone.update(names[1:])
    return [merged.get(layer.name, layer) for layer in layers if layer.name not in gone]


def _spec(name: str, hidden: int, inter: int, heads: int, kv: int, layers: int,
          model_type: str) -> ModelSpec:
    return ModelSpec(name, hidden, inter, heads, kv, hidden // heads, layers, model_type=model_type)


# Published Hugging Face config.json values (hidden, intermediate, heads, kv heads, layers,
# model_type).
MODEL_PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("llama-2-7b", 4096, 11008, 32, 32, 32, "llama"),
        _spec("llama-2-13b", 5120, 13824, 40, 40, 40, "llama"),
        _spec("llama-2-70b", 8192, 28672, 64, 8, 80, "llama"),
        _spec("llama-3-8b", 4096, 14336, 32, 8, 32, "llama"),
        _spec("llama-3-70b", 8192, 28672, 64, 8, 80, "llama"),
        _spec("mistral-7b", 4096, 14336, 32, 8, 32, "mistral"),
        _spec("qwen2.5-7b", 3584, 18944, 28, 4, 28, "qwen2"),
        _spec("qwen2.5-14b", 5120, 13824, 40, 8, 48, "qwen2"),
        _spec("qwen2.5-32b", 5120, 27648, 40, 8, 64, "qwen2"),
        _spec("qwen2.5-72b", 8192, 29568, 64, 8, 80, "qwen2"),
    )
}

def _int_field(cfg: Mapping[str, Any], key: str, source: str) -> int:
    if key not in cfg:
        raise InvalidProblemError(f"{source}: missing field {key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidProblemError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def spec_from_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelSpec:
    """Read a Hugging Face `config.json` dict (multimodal configs: their `text_config`)."""
    if not isinstance(cfg, Mapping):
        raise InvalidProblemError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    text = cfg.get("text_config")
    body: Mapping[str, Any] = text if "hidden_size" not in cfg and isinstance(text, Mapping) else cfg
    hidden = _int_field(body, "hidden_size", source)
    heads = _int_field(body, "num_attention_heads", source)
    kv = _int_field(body, "num_key_value_heads", source) if body.get("num_key_value_heads") is not None else heads
    if body.get("head_dim") is not None:
        head_dim = _int_field(body, "head_dim", source)
    else:
        if hidden % heads:
            raise InvalidProblemError(
                f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                "and no head_dim is given"
            )
        head_dim = hidden // heads
    bits = group = act = fmt_name = None
    q = cfg.get("quantization_config")
    if q is not None:
        fmt = read_format(q, source)  # refuses EXL2, bitsandbytes, AWQ gemv, mixed bits, ...
        bits, group, act, fmt_name = fmt.bits, fmt.group_size, fmt.act_order, fmt.name
    name = str(cfg.get("_name_or_path") or cfg.get("model_type") or source)
    model_type = body.get("model_type") or cfg.get("model_type")
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        intermediate_size=_int_field(body, "intermediate_size", source),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_hidden_layers=_int_field(body, "num_hidden_layers", source),
        bits=bits,
        group_size=group,
        act_order=act,
        quant_format=fmt_name,
        model_type=model_type if isinstance(model_type, str) else None,
    )


def load_config(path: str | Path) -> ModelSpec:
    """Parse `path` (a config.json, or a model directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidProblemError(f"cannot read model config {str(p)!r}: {exc.strerror or exc}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidProblemError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return spec_from_config(cfg, str(p))


def _preset_key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def model_spec(name_or_path: str | Path) -> ModelSpec:
    """A preset by name (case and `_`/`-` insensitive) or a config.json / model directory."""
    if isinstance(name_or_path, str) and _preset_key(name_or_path) in MODEL_PRESETS:
        return MODEL_PRESETS[_preset_key(name_or_path)]
    p = Path(name_or_path)
    if p.is_file() or p.is_dir() or str(name_or_path).endswith(".json"):
        return load_config(p)
    text = str(name_or_path)
    if "/" in text or "\\" in text or text.startswith((".", "~")):  # meant as a path
        raise InvalidProblemError(f"model {text!r}: no such file or folder (give a Hugging Face "
                                  "config.json, the folder holding it, or a preset name)")
    raise InvalidProblemError(
        f"unknown model {str(name_or_path)!r}: known presets are {', '.join(MODEL_PRESETS)}; "
        "or give a path to a Hugging Face config.json"
    )


def spec_layers(
    spec: ModelSpec,
    bits: int | None = None,
    group_size: int | None = None,
    act_order: bool | None = None,
    *,
    layout: Layout | str = DEFAULT_LAYOUT,
) -> list[Layer]:
    """The GEMMs of one decoder layer of `spec` in `layout`, each counted once per decoder layer
    (`transformers`: the groups the runtime fuses merged, `fuse_layers`).

    Explicit arguments win over the spec's quantization settings, which win over 4-bit,
    group 128, no act-order. An AWQ checkpoint's layers are the same problems as GPTQ's (they
    are converted to the GPTQ layout at load and run the same kernels), never act-order.
    """
    kind = parse_layout(layout)
    shapes = layout_shapes(spec, kind)
    b = bits if bits is not None else (spec.bits if spec.bits is not None else 4)
    g = group_size if group_size is not None else (spec.group_size if spec.group_size is not None else 128)
    a = act_order if act_order is not None else bool(spec.act_order)
    layers = []
    for name, k, n in shapes:
        try:
            problem = Problem(k, n, b, g, a)
        except InvalidProblemError as exc:
            raise InvalidProblemError(f"{spec.name} layer {name} ({k}x{n}): {exc}") from None
        layers.append(Layer(name, problem, spec.num_hidden_layers))
    return fuse_layers(layers, spec.model_type) if kind == "transformers" else layers


def model_layers(
    name_or_path: str | Path,
    bits: int | None = None,
    group_size: int | None = None,
    act_order: bool | None = None,
    *,
    layout: Layout | str = DEFAULT_LAYOUT,
) -> list[Layer]:
    """The GEMM layers of a preset or a config.json in `layout` (default: the GEMMs gemmtune's
    runtime runs, fused groups included; `"separate"`: every projection alone; `"fused"`: an
    engine's qkv, o, gate_up, down).

    `None` means: from the config's `quantization_config` (GPTQ or AWQ) if present, else 4 bits,
    group 128, no act-order.
    """
    return spec_layers(model_spec(name_or_path), bits, group_size, act_order, layout=layout)


_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_shape(text: str) -> tuple[int, int]:
    """`"4096x4096"` -> `(k, n)` (K = in_features first)."""
    m = _SHAPE.match(text) if isinstance(text, str) else None
    if not m:
        raise InvalidProblemError(f"not a shape: {text!r} (expected KxN, e.g. 4096x4096)")
    k, n = int(m.group(1)), int(m.group(2))
    if k <= 0 or n <= 0:
        raise InvalidProblemError(f"shape {text!r}: K and N must be positive")
    return k, n


def shape_layers(
    shapes: Iterable[str], bits: int = 4, group_size: int = 128, act_order: bool = False
) -> list[Layer]:
    """Layers for explicit `KxN` shapes (count 1 each), e.g. from `gemmtune tune 4096x4096`."""
    layers = []
    for text in shapes:
        k, n = parse_shape(text)
        layers.append(Layer(f"{k}x{n}", Problem(k, n, bits, group_size, act_order), 1))
    return layers


def unique_problems(layers: Iterable[Layer]) -> dict[Problem, int]:
    """Distinct problems with their summed counts (tune each shape once, weight by use)."""
    out: dict[Problem, int] = {}
    for layer in layers:
        out[layer.problem] = out.get(layer.problem, 0) + layer.count
    return out
