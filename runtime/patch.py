"""Model-level helpers: swap GPTQ / AWQ layers for `QuantLinear`, load checkpoints, quantize.

`patch(model)` recognises quantized linear modules by their tensors (`qweight`, `qzeros`,
`scales`, optional `g_idx` and `bias`), not by class, so the layers of Hugging Face / AutoGPTQ /
GPTQModel / AutoAWQ models all qualify without importing those packages. The tensors' shapes
say which format a module holds (`kernels.awq.is_awq_layout`: AWQ's qweight is [K, N/8], GPTQ's
[K*bits/32, N]); AWQ layers are converted to the GPTQ layout as they are replaced. It reports
every replacement with the problem and the config it resolved to, because "which config did my
model actually get" is the first question when a tuned model is not faster, and the bytes its
weights hold against their packed size, because "does it fit" is the second.

Loading streams: `load_quantized` reads the checkpoint one tensor at a time (safetensors maps the
file; nothing holds a second copy of it in host memory) and `patch` converts one module at a
time; with a CUDA `device` each layer goes to the GPU and is prepared (its kernel layout then its
only copy) before the next is read, so GPU memory while loading stays within about one layer of
the final resident size. `load_quantized` also fills a model built on the `meta` device.

Fusing: unless `fuse=False`, projections the architecture computes from one input (q/k/v,
gate/up of Llama, Mistral, Qwen2 and their derivatives: `gemmtune.kernels.fusion`) become one
`FusedGroup` each (runtime/fusion.py): one GEMM over their concatenated columns, the module tree
and state dict unchanged. While streaming, a group's members are read first and prepared
together, so the head room is about one group (q+k+v, or gate+up) instead of one layer.
"""

from __future__ import annotations

import itertools
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

from .fusion import form_group, fuse_projections, planned_groups
from .quant_linear import (
    QuantLinear,
    _validate_sym,
    as_device,
    check_config,
    check_layout,
    check_workload,
    checkpoint_file,
    open_safetensors,
)


@dataclass(frozen=True)
class PatchedLayer:
    """One layer of a report: its module name, problem, config and where the config came from."""

    name: str
    problem_key: str
    config_key: str
    """The config's key; for a plan over M bands every band's, `M 1-8: key; M >= 9: key`."""
    source: str
    device: str
    resident_bytes: int = 0
    """Bytes the layer holds for its weight on `device` (QuantLinear.resident_bytes)."""
    packed_bytes: int = 0
    """The checkpoint's bytes of the same weight: packed qweight and zeros, fp16 scales."""
    fused: str = ""
    """The problem key of the fused GEMM that computes this layer with its siblings ("" when
    it runs alone); `config_key` and `source` are that GEMM's."""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass
class PatchReport:
    """What `patch` / `load_quantized` / `describe` found; iterable over `PatchedLayer`s."""

    layers: list[PatchedLayer] = field(default_factory=list)
    separate: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    """Sibling groups the architecture would fuse that run separately, each with the reason
    (act-order permutations that differ, mixed quantization, ...)."""

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

    def resident_bytes(self) -> int:
        """Bytes all reported layers hold for their weights (see PatchedLayer.resident_bytes)."""
        return sum(la.resident_bytes for la in self.layers)

    def packed_bytes(self) -> int:
        """The checkpoint's bytes of the same weights."""
        return sum(la.packed_bytes for la in self.layers)

    def memory(self) -> str:
        """One line: the quantized weights' resident bytes against their packed size, per
        device ('1.02x' means the layers hold 2 % more than the checkpoint's weight bytes)."""
        if not self.layers:
            return "no quantized layers"
        parts = []
        for dev in dict.fromkeys(la.device for la in self.layers):
            res = sum(la.resident_bytes for la in self.layers if la.device == dev)
            packed = sum(la.packed_bytes for la in self.layers if la.device == dev)
            ratio = f"{res / packed:.2f}x" if packed else "-"
            parts.append(f"{_gb(res)} on {dev} ({ratio} their packed {_gb(packed)})")
        return "quantized weights resident: " + "; ".join(parts)

    def table(self) -> Any:
        """A rich Table with one row per distinct (problem, config, source), the bytes its layers
        hold against their packed size, and the totals as caption."""
        from rich.table import Table

        caption = self.memory()
        if self.separate:
            caption += f"; {len(self.separate)} groups not fused (e.g. {'+'.join(self.separate[0][0])}: " \
                       f"{self.separate[0][1]})"
        t = Table(title=f"gemmtune: {len(self.layers)} quantized layers", caption=caption)
        for col in ("problem", "layers", "config", "source", "resident (x packed)"):
            t.add_column(col)
        keys = sorted({(la.problem_key, la.fused, la.config_key, la.source) for la in self.layers})
        for pk, fused, ck, src in keys:
            rows = [la for la in self.layers if (la.problem_key, la.fused, la.config_key, la.source)
                    == (pk, fused, ck, src)]
            res, packed = sum(la.resident_bytes for la in rows), sum(la.packed_bytes for la in rows)
            t.add_row(pk + (f" (fused: {fused})" if fused else ""), str(len(rows)), ck, src,
                      f"{_gb(res)} ({res / packed:.2f}x)" if packed else "-")
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
    elif m.device.type == "cuda" and not m.problem.has_kernel:
        ck, src = "-", f"dense reference (no CUDA kernel for {m.bits}-bit weights)"
    elif m.device.type == "cuda":
        ck, src = "-", "unresolved"
    else:
        ck, src = "-", "cpu reference"
    g = m.fused_group
    return PatchedLayer(name, m.problem.key(), ck, src, str(m.device), m.resident_bytes(), m.packed_bytes(),
                        "" if g is None else g.problem.key())


class LayerPlacer:
    """Places new QuantLinears into a model while it loads (patch, load_quantized, and
    bench/generate.py's random models): a layer the fusion rule groups waits until its whole
    group is there, then the group is formed and prepared at once (so a streaming load builds
    one fused layout, never the members' own first); every other layer is prepared when
    placed. Reports each layer once it is prepared."""

    def __init__(self, model: nn.Module, names: list[str], fuse: bool, report: PatchReport) -> None:
        self.model, self.report = model, report
        self.group_of = {n: g for g in planned_groups(model, set(names)) for n in g} if fuse else {}
        self.pending: dict[tuple[str, ...], dict[str, QuantLinear]] = {}

    def place(self, name: str, new: QuantLinear) -> None:
        _replace(self.model, name, new)
        names = self.group_of.get(name)
        if names is None:
            self._finish([name], [new])
            return
        got = self.pending.setdefault(names, {})
        got[name] = new
        if len(got) == len(names):
            del self.pending[names]
            members = [got[n] for n in names]
            g = form_group(members, names)
            if isinstance(g, str):
                self.report.separate.append((names, g))
            self._finish(list(names), members)

    def _finish(self, names: list[str], members: list[QuantLinear]) -> None:
        for m in members:
            if m.device.type == "cuda" and not m._prepared():
                m.prepare()  # a group's first member builds the group's layout for all
        self.report.layers.extend(_layer_row(n, m) for n, m in zip(names, members, strict=True))

    def close(self) -> None:
        """Members of groups that never completed (not expected: the plan came from the model)."""
        for got in self.pending.values():
            self._finish(list(got), list(got.values()))
        self.pending.clear()


def describe(model: nn.Module) -> PatchReport:
    """The current state of every QuantLinear in `model` (e.g. after `model.cuda()`): config,
    source, device and resident bytes against packed size (`PatchReport.memory()`)."""
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
          zero_format: ZeroFormat | None = None, verbose: bool = False,
          device: torch.device | str | int | None = None, fuse: bool = True) -> PatchReport:
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
    CUDA (see `describe`). `config` pins one config for every layer.

    `device` (e.g. "cuda") moves the model there while patching: each module's tensors go to
    the device and are prepared before the next module's, then the rest of the model follows,
    so a model on the host reaches the GPU with about one layer of head room. Prints nothing
    unless `verbose`, which prints a rich table of the configs used and the resident bytes.

    `fuse` (default on): sibling projections the architecture computes from one input (q/k/v,
    gate/up of Llama, Mistral, Qwen2, ...) run as one GEMM each (runtime/fusion.py), which is
    what `gemmtune tune --model` tunes; `fuse=False` runs every projection alone (tune those
    shapes with `--layout separate`).

    Bad arguments (an unknown preset or workload, a CUDA `device` without CUDA, a format the
    modules contradict) raise before any module is replaced.
    """
    check_config(config)
    check_workload(workload)
    target = None if device is None else as_device(device)
    spec = None if quantization_config is None else read_format(quantization_config)
    # Names, not modules: a replaced module is freed as soon as it is replaced.
    names = [n for n, m in model.named_modules() if n and _is_quantized_module(m)]
    report = PatchReport()
    placer = LayerPlacer(model, names, fuse, report)
    for name in names:
        t, bias = _module_tensors(name, model.get_submodule(name), spec, zero_format)
        if target is not None:
            t, bias = t.to(target), None if bias is None else bias.to(target)
        new = QuantLinear.from_gptq_tensors(t, bias, config=config, workload=workload)
        del t, bias
        placer.place(name, new)
    placer.close()
    if target is not None:
        model.to(target)  # the rest; prepared layers stay as they are
    if verbose:
        report.print()
    return report


def _model_device(model: nn.Module) -> torch.device:
    """Where `model` lives: its first tensor not on `meta`; for a model built entirely on meta,
    the current GPU if there is one, else the host."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return as_device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _persistent_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(state-dict key, owning module, attribute, tensor) of every parameter and persistent
    buffer, shared ones under each of their names (as `state_dict` lists them), without
    building a state dict (which would rebuild every prepared layer's GPTQ tensors)."""
    for mname, m in model.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for attr, p in m._parameters.items():
            if p is not None:
                yield pre + attr, m, attr, p
        for attr, b in m._buffers.items():
            if b is not None and attr not in m._non_persistent_buffers_set:
                yield pre + attr, m, attr, b


def _load_tensor(model: nn.Module, key: str, value: torch.Tensor, device: torch.device,
                 aliases: dict[int, list[tuple[nn.Module, str]]]) -> bool:
    """Load one checkpoint tensor into the model tensor named `key`, on `device` in the model
    tensor's dtype: copied in place when that tensor is already there, otherwise put in its
    place (a meta or host tensor), under every name that shared it. False: no such tensor."""
    mname, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mname) if mname else model
    except AttributeError:
        return False
    old = mod._parameters.get(attr)
    if old is None:
        old = mod._buffers.get(attr)
        if old is None or attr in mod._non_persistent_buffers_set:
            return False
    if tuple(old.shape) != tuple(value.shape):
        raise InvalidTensorError(f"{key}: the checkpoint's shape {tuple(value.shape)} is not the "
                                 f"model's {tuple(old.shape)}")
    new = value.to(device=device, dtype=old.dtype)
    if old.device == new.device:
        mod.load_state_dict({attr: new}, strict=False)  # in place: ties stay tied
        return True
    mod.load_state_dict({attr: new}, strict=False, assign=True)
    placed = getattr(mod, attr)
    for owner, name in aliases.get(id(old), ()):
        if owner is not mod or name != attr:
            (owner._parameters if name in owner._parameters else owner._buffers)[name] = placed
    return True


def materialize(model: nn.Module, device: torch.device | str | int) -> None:
    """Every tensor of `model` still on the `meta` device is allocated on `device` and computed
    by the model's own initialiser (transformers' `_init_weights`, module by module; tensors
    already loaded are left alone); then everything else not yet on `device` moves there.

    `load_quantized` calls it for what a checkpoint cannot hold (non-persistent buffers such as
    rotary frequencies); a model built on `meta` whose linears were replaced by QuantLinears
    becomes a whole random model this way (bench/generate.py). A meta tensor no initialiser
    can fill raises InvalidTensorError."""
    device = as_device(device)
    owners: dict[int, tuple[nn.Module, list[str]]] = {}
    for mname, m in model.named_modules():
        for attr, t in itertools.chain(m._parameters.items(), m._buffers.items()):
            if t is not None and t.device.type == "meta":
                owners.setdefault(id(m), (m, []))[1].append(f"{mname}.{attr}" if mname else attr)
    if owners:
        init = getattr(model, "_init_weights", None)
        if not callable(init):
            names = [n for _, ns in owners.values() for n in ns]
            raise InvalidTensorError(
                f"{len(names)} model tensors are still on the meta device after loading (e.g. "
                f"{', '.join(names[:3])}): the checkpoint does not hold them and the model has no "
                "initialiser to compute them; build those modules on a real device")
        for m, _ in owners.values():
            # Only the meta tensors are allocated and initialised: the module's loaded ones are
            # marked as transformers marks loaded weights, so its initialiser leaves them alone.
            loaded = [t for t in itertools.chain(m._parameters.values(), m._buffers.values())
                      if t is not None and t.device.type != "meta"]
            fresh: list[tuple[str, torch.Tensor]] = []
            for attrs in (m._parameters, m._buffers):
                for attr, t in attrs.items():
                    if t is not None and t.device.type == "meta":
                        # NaN until the initialiser writes it: one it skips is caught below
                        new = torch.full_like(t, float("nan"), device=device) if t.is_floating_point() \
                            else torch.zeros_like(t, device=device)
                        attrs[attr] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                        fresh.append((attr, attrs[attr]))
            for t in loaded:
                t._is_hf_initialized = True  # type: ignore[attr-defined]
            try:
                with torch.no_grad():
                    init(m)
            finally:
                for t in loaded:
                    del t._is_hf_initialized  # type: ignore[attr-defined]
            unset = [a for a, t in fresh if t.is_floating_point() and bool(torch.isnan(t).any())]
            if unset:
                names = next(ns for mod, ns in owners.values() if mod is m)
                raise InvalidTensorError(
                    f"the model's initialiser left {unset} of {names[0].rpartition('.')[0] or 'the model'} "
                    "unset (on the meta device they have no value): build that module on a real device")
    model.to(device)


def checkpoint_quantization_config(path: str | Path) -> Mapping[str, Any]:
    """The `quantization_config` of the `config.json` beside a safetensors file (`path` may be
    the folder holding it, see `checkpoint_file`)."""
    cfg_path = checkpoint_file(path).parent / "config.json"
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
                   verbose: bool = False, device: torch.device | str | int | None = None,
                   fuse: bool = True) -> PatchReport:
    """Load a GPTQ or AWQ (GEMM) safetensors checkpoint into a plain (nn.Linear) model.

    Every `nn.Linear` whose `<name>.qweight` is in the file becomes a `QuantLinear` built from the
    file's tensors (AWQ layers converted to the GPTQ layout); all other tensors (embeddings,
    norms, unquantized heads) are loaded into the model's own. `quantization_config` defaults
    to the one in the `config.json` beside `path`. With `strict`, tensors of the file the model
    does not have, or model tensors the file lacks, raise InvalidTensorError.

    `device` is where the loaded model lives (default: where the model is; a model built on
    `meta` goes to the current GPU, or the host without one). The file is read one tensor at a
    time and each layer is prepared on a CUDA `device` before the next is read (module
    docstring). For a model built on `meta`, tensors no checkpoint holds (rotary frequencies)
    are computed by the model's initialiser (transformers models have one). `fuse`: as in
    `patch` (sibling projections of a known architecture run as one GEMM; off: each alone).

    `path` may be a folder holding `model.safetensors` or a single `*.safetensors` file. Bad
    arguments (a missing path, a file that is not safetensors, an unknown preset or workload, a
    CUDA `device` without CUDA) raise a typed error before the model is touched.
    """
    check_config(config)
    check_workload(workload)
    target = _model_device(model) if device is None else as_device(device)
    path = checkpoint_file(path)
    if quantization_config is None:
        quantization_config = checkpoint_quantization_config(path)
    spec = read_format(quantization_config, str(path))
    report = PatchReport()
    with open_safetensors(path) as f:
        keys = set(f.keys())
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.qweight" in keys]
        replaced = tuple(f"{n}." for n in names)
        expected = {k for k, *_ in _persistent_tensors(model) if not k.startswith(replaced)}
        used: set[str] = set()
        placer = LayerPlacer(model, names, fuse, report)
        for name in names:
            tensors = {}
            for short in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                full = f"{name}.{short}"
                if full in keys:
                    tensors[short] = f.get_tensor(full).to(target)
                    used.add(full)
            try:
                new = QuantLinear.from_checkpoint_tensors(tensors, spec, config=config, workload=workload)
            except KeyError as exc:
                raise InvalidTensorError(f"{path}: layer {name} lacks {exc}") from None
            except (InvalidProblemError, InvalidTensorError) as exc:
                raise type(exc)(f"{name}: {exc}") from None
            del tensors
            placer.place(name, new)
        placer.close()
        aliases: dict[int, list[tuple[nn.Module, str]]] = {}
        for _, m, attr, t in _persistent_tensors(model):
            aliases.setdefault(id(t), []).append((m, attr))
        unexpected = []
        for key in sorted(keys - used):
            if _load_tensor(model, key, f.get_tensor(key), target, aliases):
                used.add(key)
            else:
                unexpected.append(key)
        del aliases
    missing = sorted(expected - used)
    if strict and (missing or unexpected):
        what = (f"missing {missing[:5]}" if missing else "") + \
            (f" unexpected {unexpected[:5]}" if unexpected else "")
        raise InvalidTensorError(f"{path} does not match the model: {what.strip()}")
    materialize(model, target)
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
                   generator: torch.Generator | None = None, fuse: bool = True) -> list[str]:
    """Replace `nn.Linear` layers (names matching the `include` regex/predicate and not
    `exclude`; the LM head is excluded by default, as GPTQ tools do) with `QuantLinear`s
    quantized by the project's RTN quantizer. Returns the replaced names.

    For tests and benchmarks (random-weight models): real checkpoints come quantized already.
    `fuse`: as in `patch` (what a loaded checkpoint would run).
    """
    check_config(config)
    check_workload(workload)
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
    if fuse:
        fuse_projections(model)
    return [n for n, _ in targets]
