"""Model-level helpers: swap GPTQ / AWQ layers for `QuantLinear`, load checkpoints, quantize.

`patch(model)` recognises quantized linear modules by their tensors (`qweight`, `qzeros`,
`scales`, optional `g_idx` and `bias`), not by class, so the layers of Hugging Face / AutoGPTQ /
GPTQModel / AutoAWQ models all qualify without importing those packages. The tensors' shapes
say which format a module holds (`kernels.awq.is_awq_layout`: AWQ's qweight is [K, N/8], GPTQ's
[K*bits/32, N]); AWQ layers are converted to the GPTQ layout as they are replaced. It reports
every replacement with the problem and the config it resolved to, because "which config did my
model actually get" is the first question when a tuned model is not faster.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gemmtune.kernels.awq import AWQTensors, is_awq_layout, to_gptq
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.errors import InvalidProblemError, InvalidTensorError
from gemmtune.kernels.formats import QuantFormat, read_format
from gemmtune.kernels.gptq import GPTQTensors, ZeroFormat, quantize
from gemmtune.kernels.problem import SUPPORTED_GROUPS
from gemmtune.kernels.workload import Workload
from torch import nn

from .quant_linear import QuantLinear, _validate_sym, check_layout


@dataclass(frozen=True)
class PatchedLayer:
    """One layer of a report: its module name, problem, config and where the config came from."""

    name: str
    problem_key: str
    config_key: str
    """The config's key; for a plan over M bands every band's, `M 1-8: key; M >= 9: key`."""
    source: str
    device: str


@dataclass
class PatchReport:
    """What `patch` / `load_quantized` / `describe` found; iterable over `PatchedLayer`s."""

    layers: list[PatchedLayer] = field(default_factory=list)

    def __iter__(self) -> Iterator[PatchedLayer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def configs(self) -> dict[tuple[str, str, str], int]:
        """(problem key, config key, source) -> number of layers: one row per distinct choice."""
        out: dict[tuple[str, str, str], int] = {}
        for la in self.layers:
            k = (la.problem_key, la.config_key, la.source)
            out[k] = out.get(k, 0) + 1
        return out

    def table(self) -> Any:
        """A rich Table with one row per distinct (problem, config, source)."""
        from rich.table import Table

        t = Table(title=f"gemmtune: {len(self.layers)} quantized layers")
        for col in ("problem", "layers", "config", "source"):
            t.add_column(col)
        for (pk, ck, src), n in sorted(self.configs().items()):
            t.add_row(pk, str(n), ck, src)
        return t

    def print(self) -> None:
        from rich.console import Console

        Console().print(self.table())


def _layer_row(name: str, m: QuantLinear) -> PatchedLayer:
    res = m.lookup_result
    if res is not None and len(m.bands) > 1:
        ck = "; ".join(f"{b.span}: {b.config.key()}" for b in m.bands)
        src = ", ".join(dict.fromkeys(b.source for b in m.bands))
    elif res is not None:
        ck, src = res.config.key(), res.source
    elif m.qweight.is_cuda:
        ck, src = "-", "unresolved"
    else:
        ck, src = "-", "cpu reference"
    return PatchedLayer(name, m.problem.key(), ck, src, str(m.qweight.device))


def describe(model: nn.Module) -> PatchReport:
    """The current state of every QuantLinear in `model` (e.g. after `model.cuda()`)."""
    return PatchReport([_layer_row(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)])


def _is_quantized_module(m: nn.Module) -> bool:
    if isinstance(m, QuantLinear):
        return False
    return all(isinstance(getattr(m, n, None), torch.Tensor) for n in ("qweight", "qzeros", "scales"))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _zero_format_of(m: nn.Module, override: ZeroFormat | None, spec: QuantFormat | None) -> ZeroFormat:
    if override is not None:
        return override
    for attr in ("zero_format", "checkpoint_format"):
        v = getattr(m, attr, None)
        if v in ("v1", "gptq"):
            return "v1"
        if v in ("v2", "gptq_v2"):
            return "v2"
    return spec.zero_format if spec is not None else "v1"


def _awq_module_tensors(m: nn.Module, spec: QuantFormat | None) -> GPTQTensors:
    """An AWQ module (AutoAWQ's `WQLinear_GEMM`: `w_bit`; GPTQModel's: `bits`) in the GPTQ layout.
    The group size follows from the shapes (K / rows of scales), so no config is needed; one
    given must agree."""
    qweight, qzeros, scales = m.qweight, m.qzeros, m.scales
    bits = getattr(m, "w_bit", None) or getattr(m, "bits", None) or 4
    k, g = qweight.shape[0], scales.shape[0]  # type: ignore[union-attr]
    if g == 0 or k % g:
        raise InvalidTensorError(f"AWQ qweight has K={k} rows, not a multiple of scales' {g} groups")
    if spec is not None and spec.group_size != k // g:
        raise InvalidTensorError(f"quantization_config says group_size={spec.group_size} but the "
                                 f"tensors have {g} groups of {k // g} rows")
    a = AWQTensors(qweight.contiguous(), qzeros.contiguous(),  # type: ignore[union-attr]
                   scales.to(torch.float16).contiguous(), k // g, int(bits))  # type: ignore[union-attr]
    return to_gptq(a.validate())


def _module_tensors(name: str, m: nn.Module, spec: QuantFormat | None,
                    zero_format: ZeroFormat | None) -> tuple[GPTQTensors, torch.Tensor | None]:
    qweight: torch.Tensor = m.qweight  # type: ignore[assignment]
    bias = getattr(m, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if spec is not None:
        check_layout(spec.method, qweight, m.qzeros, m.scales, name)  # type: ignore[arg-type]
    if is_awq_layout(qweight, m.qzeros, m.scales):  # type: ignore[arg-type]
        try:
            return _awq_module_tensors(m, spec), bias
        except (InvalidProblemError, InvalidTensorError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    bits = getattr(m, "bits", None) or (spec.bits if spec else None)
    group = getattr(m, "group_size", None) or (spec.group_size if spec else None)
    if bits is None or group is None:
        raise InvalidProblemError(
            f"{name}: GPTQ module without `bits`/`group_size` attributes; pass quantization_config")
    bits, group = int(bits), int(group)
    k = qweight.shape[0] * 32 // bits
    if group == k and group not in SUPPORTED_GROUPS:
        group = -1  # AutoGPTQ stores group_size=-1 as in_features
    g_idx = getattr(m, "g_idx", None)
    t = GPTQTensors(qweight.contiguous(), m.qzeros.contiguous(),  # type: ignore[union-attr]
                    m.scales.to(torch.float16).contiguous(),  # type: ignore[union-attr]
                    g_idx.to(torch.int32).contiguous() if isinstance(g_idx, torch.Tensor) else None,
                    bits, group, _zero_format_of(m, zero_format, spec))
    try:
        t.validate()
        if spec is not None and spec.sym:
            _validate_sym(t)
    except (InvalidProblemError, InvalidTensorError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    return t, bias


def patch(model: nn.Module, quantization_config: Mapping[str, Any] | Any | None = None, *,
          config: KernelConfig | str | None = None, workload: Workload | str | None = None,
          zero_format: ZeroFormat | None = None, verbose: bool = False) -> PatchReport:
    """Replace every GPTQ or AWQ linear module of `model` (in place) with a `QuantLinear`.

    Modules qualify by having `qweight`, `qzeros` and `scales` tensors. AWQ GEMM modules
    (AutoAWQ's `WQLinear_GEMM`, transformers' and GPTQModel's AWQ layers) are told apart by
    their shapes and converted to the GPTQ layout; their group size follows from the shapes.
    For GPTQ modules `bits` / `group_size` come from the module or `quantization_config` (the
    checkpoint's, which also gives the zero convention; `zero_format` overrides it, e.g. "v2"
    for GPTQModel modules that converted their zeros in memory). A `quantization_config` whose
    format contradicts a module's shapes raises InvalidTensorError; an unsupported one,
    UnsupportedFormatError. Layers on CUDA are prepared (config looked up, kernels
    compiled) now; CPU layers run the reference path and resolve their config when moved to
    CUDA (see `describe`). `config` pins one config for every layer. Prints nothing unless
    `verbose`, which prints a rich table of the configs used.
    """
    spec = None if quantization_config is None else read_format(quantization_config)
    found = [(n, m) for n, m in model.named_modules() if n and _is_quantized_module(m)]
    report = PatchReport()
    for name, m in found:
        t, bias = _module_tensors(name, m, spec, zero_format)
        new = QuantLinear.from_gptq_tensors(t, bias, config=config, workload=workload)
        if new.qweight.is_cuda:
            new.prepare()
        _replace(model, name, new)
        report.layers.append(_layer_row(name, new))
    if verbose:
        report.print()
    return report


def checkpoint_quantization_config(path: str | Path) -> Mapping[str, Any]:
    """The `quantization_config` of the `config.json` beside a safetensors file."""
    cfg_path = Path(path).parent / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidProblemError(
            f"no quantization_config given and {cfg_path} cannot be read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidProblemError(f"{cfg_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, Mapping) else None
    if not isinstance(qc, Mapping):
        raise InvalidProblemError(f"{cfg_path} has no quantization_config: is this a quantized checkpoint?")
    return qc


def load_quantized(model: nn.Module, path: str | Path,
                   quantization_config: Mapping[str, Any] | Any | None = None,
                   *, config: KernelConfig | str | None = None,
                   workload: Workload | str | None = None, strict: bool = True,
                   verbose: bool = False) -> PatchReport:
    """Load a GPTQ or AWQ (GEMM) safetensors checkpoint into a plain (nn.Linear) model.

    Every `nn.Linear` whose `<name>.qweight` is in the file becomes a `QuantLinear` built from the
    file's tensors (AWQ layers converted to the GPTQ layout); all other tensors (embeddings,
    norms, unquantized heads) are loaded with `load_state_dict`. `quantization_config` defaults
    to the one in the `config.json` beside `path`. With `strict`, tensors of the file the model
    does not have, or model tensors the file lacks, raise InvalidTensorError.
    """
    from safetensors import safe_open

    if quantization_config is None:
        quantization_config = checkpoint_quantization_config(path)
    spec = read_format(quantization_config, str(path))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    report = PatchReport()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        linears = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and f"{n}.qweight" in keys]
        used: set[str] = set()
        for name, _lin in linears:
            tensors = {}
            for short in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                full = f"{name}.{short}"
                if full in keys:
                    tensors[short] = f.get_tensor(full).to(device)
                    used.add(full)
            try:
                new = QuantLinear.from_checkpoint_tensors(tensors, spec, config=config, workload=workload)
            except KeyError as exc:
                raise InvalidTensorError(f"{path}: layer {name} lacks {exc}") from None
            except (InvalidProblemError, InvalidTensorError) as exc:
                raise type(exc)(f"{name}: {exc}") from None
            if new.qweight.is_cuda:
                new.prepare()
            _replace(model, name, new)
            report.layers.append(_layer_row(name, new))
        rest = {k: f.get_tensor(k) for k in keys - used}
    replaced = tuple(f"{n}." for n, _ in linears)
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(replaced)]
    if strict and (missing or result.unexpected_keys):
        what = (f"missing {missing[:5]}" if missing else "") + \
            (f" unexpected {result.unexpected_keys[:5]}" if result.unexpected_keys else "")
        raise InvalidTensorError(f"{path} does not match the model: {what.strip()}")
    if verbose:
        report.print()
    return report


def _name_filter(include: str | Callable[[str], bool] | None,
                 exclude: str | Callable[[str], bool] | None) -> Callable[[str], bool]:
    def as_fn(f: str | Callable[[str], bool] | None, default: bool) -> Callable[[str], bool]:
        if f is None:
            return lambda _n: default
        if callable(f):
            return f
        rx = re.compile(f)
        return lambda n: rx.search(n) is not None

    inc, exc = as_fn(include, True), as_fn(exclude, False)
    return lambda n: inc(n) and not exc(n)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, act_order: bool = False,
                   *, sym: bool = False, zero_format: ZeroFormat = "v1",
                   include: str | Callable[[str], bool] | None = None,
                   exclude: str | Callable[[str], bool] | None = r"(^|\.)lm_head$",
                   config: KernelConfig | str | None = None,
                   workload: Workload | str | None = None,
                   generator: torch.Generator | None = None) -> list[str]:
    """Replace `nn.Linear` layers (names matching the `include` regex/predicate and not
    `exclude`; the LM head is excluded by default, as GPTQ tools do) with `QuantLinear`s
    quantized by the project's RTN quantizer. Returns the replaced names.

    For tests and benchmarks (random-weight models): real checkpoints come quantized already.
    """
    keep = _name_filter(include, exclude)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n)]
    for name, lin in targets:
        w = lin.weight.detach().t().contiguous()
        dev = w.device
        try:
            t = quantize(w.cpu().float(), bits, group_size, act_order, sym, zero_format, generator)
        except (InvalidProblemError, InvalidTensorError) as exc:
            raise type(exc)(f"{name}: {exc} (pass exclude= to skip it)") from None
        new = QuantLinear.from_gptq_tensors(t.to(dev), lin.bias, config=config, workload=workload)
        _replace(model, name, new)
    return [n for n, _ in targets]
