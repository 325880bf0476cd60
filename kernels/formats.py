"""Which checkpoint format a `quantization_config` describes, or one line saying why not.

Why this module exists: a checkpoint's `config.json` carries a `quantization_config`, and it
decides how the tensors must be read (is the zero stored minus one? are the nibbles of a word in
AWQ's interleaved order?) and which problems are worth tuning (act-order or not). Reading it in
several places let `"quant_method": "awq"` pass as GPTQ. Every reader (`gemmtune tune --config` /
`--model PATH`, `patch`, `load_quantized`, `QuantLinear.from_safetensors`) now asks
:func:`read_format`, so a format is accepted, or refused, by this one rule.

Read (`QuantFormat`):

* **GPTQ** (`quant_method` "gptq", or absent as in AutoGPTQ's `quantize_config.json`): `bits`
  (2, 3, 4, 8), `group_size` (-1, 32, 64, 128), `desc_act`, `static_groups`, `sym`, and
  `checkpoint_format` (GPTQModel; older files say `format`): "gptq" = zeros stored minus one
  (v1), "gptq_v2" = zeros stored as they are (v2). GPTQModel's per-module `dynamic` overrides are
  accepted only when they exclude modules (`-:` patterns) or repeat the top-level settings.
* **AWQ GEMM** (`quant_method` "awq", as AutoAWQ, transformers and GPTQModel write it): `bits`
  (or AutoAWQ's `w_bit`) = 4, `group_size` (or `q_group_size`) 32/64/128, `zero_point` true,
  `version` / `checkpoint_format` / `format` "gemm" where given (transformers 5 writes both
  `format` and `version`; its `backend` is a kernel choice at load, ignored unless "llm-awq";
  its `sym` is ignored too: AWQ's zeros are read from `qzeros`). The tensors are converted to
  the GPTQ layout at load (see `kernels/awq.py`).

Refused with :class:`UnsupportedFormatError` naming the field and value: any other
`quant_method` (EXL2's "exl2", "bitsandbytes", "fp8", "compressed-tensors", "hqq", ...), GPTQ
`checkpoint_format`s other than gptq/gptq_v2 (marlin, bitblas, qqq, ...), AWQ versions other than
gemm (gemv, gemv_fast, marlin, exllama, ipex), AWQ without zero points, llm-awq's packing, and
mixed bit widths (a non-integer or per-module `bits`).

`desc_act` with `static_groups`: GPTQ then quantizes columns in activation order but assigns
groups by original position, so every stored `g_idx[k]` is `k // group_size`. Such layers need no
row permutation and are tuned as plain (non-act-order) problems: :attr:`QuantFormat.act_order`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import InvalidProblemError, UnsupportedFormatError
from .problem import SUPPORTED_BITS, SUPPORTED_GROUPS

if TYPE_CHECKING:  # gptq imports torch; reading a config.json should not need it
    from .gptq import ZeroFormat

Method = Literal["gptq", "awq"]

METHODS: tuple[str, ...] = ("gptq", "awq")
"""`quant_method` values gemmtune reads."""

GPTQ_CHECKPOINT_FORMATS: dict[str, ZeroFormat] = {"gptq": "v1", "gptq_v2": "v2"}
"""GPTQ `checkpoint_format` -> how the zeros are stored."""

AWQ_BITS: tuple[int, ...] = (4,)
AWQ_GROUPS: tuple[int, ...] = (32, 64, 128)
AWQ_VERSIONS: tuple[str, ...] = ("gemm",)
AWQ_REFUSED_BACKENDS: tuple[str, ...] = ("llm-awq",)

_DYNAMIC_FIELDS = ("bits", "group_size", "sym", "desc_act", "static_groups")


@dataclass(frozen=True)
class QuantFormat:
    """What a checkpoint's `quantization_config` says about its quantized linears.

    Field order keeps the positional signature of the former `GPTQSpec` (bits, group_size,
    desc_act, sym, zero_format). `sym` only validates GPTQ zeros (symmetric GPTQ stores
    2**(bits-1)); the math is the same either way. For AWQ, `zero_format` is "v2": its zeros are
    stored as they are, which is what its tensors become after conversion.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    zero_format: ZeroFormat = "v1"
    method: Method = "gptq"
    static_groups: bool = False

    @property
    def act_order(self) -> bool:
        """Whether layers have permuted rows (a non-trivial `g_idx`): the `Problem.act_order`
        to tune. False with `static_groups`, whose `g_idx` is always `k // group_size`."""
        return self.method == "gptq" and self.desc_act and not self.static_groups

    @property
    def name(self) -> str:
        """Short label: "gptq" (v1 zeros), "gptq_v2" or "awq"."""
        if self.method == "awq":
            return "awq"
        return "gptq_v2" if self.zero_format == "v2" else "gptq"

    @classmethod
    def from_config(cls, qc: Mapping[str, Any] | Any, where: str = "") -> QuantFormat:
        """Same as :func:`read_format` (kept for callers of the former `GPTQSpec`)."""
        return read_format(qc, where)


def _as_mapping(qc: Mapping[str, Any] | Any, where: str) -> Mapping[str, Any]:
    """A dict (`config.json`'s `quantization_config`) or a transformers config object."""
    if isinstance(qc, Mapping):
        return qc
    if hasattr(qc, "to_dict"):
        d = qc.to_dict()
        if isinstance(d, Mapping):
            return d
    if hasattr(qc, "__dict__"):
        return vars(qc)
    raise InvalidProblemError(f"{where}quantization_config must be an object, got {type(qc).__name__}")


def _text(value: Any) -> str:
    """Lower-case string of a config value; enum members (transformers') by their value."""
    return str(getattr(value, "value", value)).strip().lower()


class _Reader:
    """Field access that names `quantization_config.<field>` in every message."""

    def __init__(self, qc: Mapping[str, Any], where: str) -> None:
        self.qc = qc
        self.prefix = f"{where}: " if where else ""

    def label(self, key: str) -> str:
        return f"{self.prefix}quantization_config.{key}"

    def first(self, *keys: str) -> tuple[str, Any]:
        """(key, value) of the first key present and not null, else (keys[0], None)."""
        for key in keys:
            if self.qc.get(key) is not None:
                return key, self.qc[key]
        return keys[0], None

    def flag(self, key: str, default: bool) -> bool:
        value = self.qc.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidProblemError(f"{self.label(key)} must be true or false, got {value!r}")
        return value

    def bits(self, keys: tuple[str, ...], allowed: tuple[int, ...], default: int = 4) -> int:
        key, value = self.first(*keys)
        if value is None:
            return default
        if isinstance(value, str | bool):  # a type slip, not a mixed-width model
            raise UnsupportedFormatError(
                f"{self.label(key)}={value!r}: a {type(value).__name__} is not supported, the "
                f"bit width is an integer (one of {', '.join(map(str, allowed))})")
        if not isinstance(value, int | float) or value != int(value):
            raise UnsupportedFormatError(
                f"{self.label(key)}={value!r}: mixed or fractional bit widths are not supported "
                f"(one integer width for every layer: {', '.join(map(str, allowed))})")
        if int(value) not in allowed:
            raise UnsupportedFormatError(
                f"{self.label(key)}={value!r} is not supported (choose from {allowed})")
        return int(value)

    def group(self, keys: tuple[str, ...], allowed: tuple[int, ...], default: int = 128) -> int:
        key, value = self.first(*keys)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise UnsupportedFormatError(
                f"{self.label(key)}={value!r} is not supported (choose from {allowed})")
        return value


def _check_dynamic(r: _Reader, top: dict[str, Any]) -> None:
    """GPTQModel's `dynamic`: {pattern: overrides}. `-:` patterns leave modules unquantized (they
    then have no qweight and are not touched); a positive pattern may only repeat `top`."""
    dynamic = r.qc.get("dynamic")
    if not dynamic:
        return
    if not isinstance(dynamic, Mapping):
        raise InvalidProblemError(f"{r.label('dynamic')} must be an object, got {dynamic!r}")
    for pattern, override in dynamic.items():
        if str(pattern).startswith("-:"):
            continue
        if not isinstance(override, Mapping):
            raise InvalidProblemError(f"{r.label('dynamic')}[{pattern!r}] must be an object")
        for key in _DYNAMIC_FIELDS:
            if key in override and override[key] != top[key]:
                what = "mixed bit widths are" if key == "bits" else f"per-module {key} is"
                raise UnsupportedFormatError(
                    f"{r.label('dynamic')}[{pattern!r}].{key}={override[key]!r}: {what} not "
                    f"supported (top level {key}={top[key]!r})")


def _read_gptq(r: _Reader) -> QuantFormat:
    key, raw = r.first("checkpoint_format", "format")
    fmt = "gptq" if raw is None or raw == "" else _text(raw)
    if fmt not in GPTQ_CHECKPOINT_FORMATS:
        raise UnsupportedFormatError(
            f"{r.label(key)}={fmt!r} is not supported (supported: "
            f"{', '.join(GPTQ_CHECKPOINT_FORMATS)})")
    bits = r.bits(("bits",), SUPPORTED_BITS)
    group = r.group(("group_size",), SUPPORTED_GROUPS)
    desc_act = r.flag("desc_act", False)
    static_groups = r.flag("static_groups", False)
    sym = r.flag("sym", True)
    _check_dynamic(r, {"bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
                       "static_groups": static_groups})
    return QuantFormat(bits, group, desc_act, sym, GPTQ_CHECKPOINT_FORMATS[fmt], "gptq", static_groups)


def _read_awq(r: _Reader) -> QuantFormat:
    for key in ("version", "checkpoint_format", "format"):
        value = r.qc.get(key)
        if value is not None and _text(value) not in AWQ_VERSIONS:
            raise UnsupportedFormatError(
                f"{r.label(key)}={_text(value)!r} is not supported (AWQ checkpoints are read in "
                f"the {', '.join(AWQ_VERSIONS)} version only)")
    # `backend` is mostly transformers' choice of kernel at load (auto, gemm, marlin, ...), not
    # a storage format; only "llm-awq" (the original MIT code) names another packing.
    backend = r.qc.get("backend")
    if backend is not None and _text(backend) in AWQ_REFUSED_BACKENDS:
        raise UnsupportedFormatError(
            f"{r.label('backend')}={_text(backend)!r} is not supported (llm-awq packs its "
            f"tensors differently from AutoAWQ's GEMM format)")
    if not r.flag("zero_point", True):
        raise UnsupportedFormatError(
            f"{r.label('zero_point')}=False is not supported (AWQ GEMM layers carry qzeros)")
    bits = r.bits(("bits", "w_bit"), AWQ_BITS)
    group = r.group(("group_size", "q_group_size"), AWQ_GROUPS)
    return QuantFormat(bits, group, False, False, "v2", "awq", False)


def read_format(qc: Mapping[str, Any] | Any, where: str = "") -> QuantFormat:
    """The format of a `quantization_config` (dict or transformers config object).

    `where` (e.g. the config.json path) prefixes every message. Raises UnsupportedFormatError
    (one line naming the field and value) for formats gemmtune does not read, and
    InvalidProblemError for values of the wrong type.
    """
    r = _Reader(_as_mapping(qc, f"{where}: " if where else ""), where)
    method = _text(r.qc.get("quant_method") or "gptq")
    if method == "gptq":
        return _read_gptq(r)
    if method == "awq":
        return _read_awq(r)
    raise UnsupportedFormatError(
        f"{r.label('quant_method')}={method!r} is not supported (gemmtune reads "
        f"{', '.join(METHODS)} checkpoints)")
