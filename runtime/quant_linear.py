"""`QuantLinear`: a GPTQ linear layer that runs with its tuned kernel configuration.

Why it is shaped like this:

- The checkpoint tensors (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`) are registered buffers
  under the names AutoGPTQ / GPTQModel use, so `state_dict()` round-trips with GPTQ checkpoints.
  AWQ layers are repacked into this layout once, when built (`from_awq_tensors`): their
  `state_dict()` is then GPTQ's (`gptq_v2` zeros), not the AWQ file's.
- One copy of the weight on the GPU. Once prepared on CUDA, the kernel layout
  (`kernels.weights.QuantizedWeight`) is the layer's only copy of its weight: the `qweight`,
  `qzeros`, `scales` and `g_idx` buffers are emptied (None) and rebuilt bit for bit from the
  layout when asked for: `gptq_tensors()` (on the layer's device), `state_dict()` (on the host,
  one layer at a time, so saving a model does not need its weights twice on the GPU),
  `load_state_dict`, `.cpu()` / a move to another device, `copy.deepcopy` and pickling. Keeping
  the checkpoint tensors on the host instead would cost host RAM equal to the whole checkpoint
  for the model's lifetime (35 GB for a 70B model) to save a rebuild that takes milliseconds
  per layer and happens only when saving or moving. `resident_bytes()` / `packed_bytes()` say
  what a layer holds against its checkpoint size (`describe` sums them).
- Everything expensive happens once, at preparation (on `.to(cuda)` / `.cuda()`, an explicit
  `prepare()`, or the first CUDA forward): the kernel-ready `QuantizedWeight`, the config
  lookup, and the dispatch plan with every kernel it may launch compiled. `forward` then does a
  few attribute checks and launches: no lookups, no compilation, no per-call allocation beyond
  the output, so a whole decode step can be captured in a CUDA graph.
- The looked-up answer is a plan over M bands (`gemmtune.db.resolve`: a tuned plan, or a
  decode entry's bands below a larger workload's): one dispatch `Plan` per band, each compiled
  for the Ms its band serves. A call finds its band with one `bisect` over the band edges
  (`band_edges`; no table, so an edge at M = 65536 costs no memory), a C call on a tuple of at
  most a handful of ints: ~45 ns measured (CPython 3.11, three edges; the two-band compare it
  replaces took ~12 ns) beside the ~20 µs of a launch, and skipped for a one-band layer.
- CPU tensors take the reference path (dequantize once, cache the dense weight, `F.linear`), so
  the same module works in CI and gives the oracle's numbers.
- Output shape and dtype are those of `nn.Linear` for the same input: the CUDA kernels compute in
  fp16, so bf16/fp32 CUDA inputs are cast to fp16 for the kernel and the output cast back.
- Under `torch.compile` the call is one custom op, `gemmtune::quant_linear` (runtime/ops.py),
  that runs `forward_eager`: no graph break, the same numbers. Eager calls skip the op (the
  dispatcher would only add host time to the hot path).
- A layer may be a member of a `FusedGroup` (runtime/fusion.py): siblings that read the same
  input (q/k/v, gate/up) computed by one GEMM over their concatenated columns. It then holds a
  column view of the group's one fused layout as its weight (`_qw.view_of`), and its calls go
  through the group; everything else (state dict, copies, moves, reports) is the layer's own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from gemmtune.db.resolve import Band
from gemmtune.kernels.awq import AWQTensors, is_awq_layout, to_gptq
from gemmtune.kernels.config import PRESETS, KernelConfig, preset
from gemmtune.kernels.errors import (
    CudaUnavailableError,
    InvalidConfigError,
    InvalidProblemError,
    InvalidTensorError,
)
from gemmtune.kernels.formats import QuantFormat, read_format
from gemmtune.kernels.gptq import GPTQTensors, ZeroFormat, zeros
from gemmtune.kernels.problem import KERNEL_BITS, Problem
from gemmtune.kernels.weights import packed_bytes
from gemmtune.kernels.workload import WORKLOADS, Workload
from torch import nn

from . import ops
from .lookup import LookupResult, device_info, resolve

if TYPE_CHECKING:
    from .fusion import FusedGroup

GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")
"""The checkpoint buffers the kernel layout replaces once a layer is prepared on CUDA."""

GPTQSpec = QuantFormat
"""The former name of `QuantFormat` (GPTQ only then); same fields, same positional order."""


def check_layout(method: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 name: str = "") -> None:
    """Refuse tensors whose shapes contradict the format the config names: AWQ's qweight is
    [K, N/8], GPTQ's [K*bits/32, N] (`kernels.awq.is_awq_layout` tells them apart). Reading one
    as the other would permute the weights silently."""
    awq = is_awq_layout(qweight, qzeros, scales)
    if awq == (method == "awq"):
        return
    where = f"{name}: " if name else ""
    found, said = ("AWQ's", "gptq") if awq else ("not AWQ's", "awq")
    raise InvalidTensorError(
        f"{where}quantization_config says quant_method={said} but the tensors have {found} shapes "
        f"(qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)})")


def check_config(config: object) -> None:
    """Refuse a `config` argument the lookup could not use (a typo'd preset, a wrong type) when
    it is given: otherwise it surfaces only at the first CUDA preparation, or never on CPU.
    Valid: None (look the config up), a KernelConfig, a preset name, a dict of its fields."""
    if config is None or isinstance(config, KernelConfig):
        return
    known = ", ".join(PRESETS)
    if isinstance(config, str):
        try:
            preset(config)  # what the lookup resolves a name with
        except InvalidConfigError:
            raise InvalidConfigError(
                f"config={config!r} is not a preset (known: {known}); pass one of them, a "
                "KernelConfig, or None to look the config up") from None
        return
    if isinstance(config, dict):
        try:
            KernelConfig.from_dict(config)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"config dict: {exc}") from None
        return
    raise InvalidConfigError(
        f"config must be a preset name ({known}), a KernelConfig, a dict of its fields or None, "
        f"got {type(config).__name__} {config!r}")


def check_workload(workload: object) -> None:
    """Refuse a `workload` argument the lookup could not parse, when it is given (the lookup
    would raise only at the first CUDA preparation). Valid: None, a Workload, a preset name or
    Ms like `1,2,4` / `1:4,512:1` (`Workload.parse`)."""
    if workload is None or isinstance(workload, Workload):
        return
    if not isinstance(workload, str):
        raise InvalidProblemError(
            f"workload must be a Workload, a preset name ({', '.join(WORKLOADS)}), Ms like "
            f"'1,2,4' or '1:4,512:1', or None, got {type(workload).__name__} {workload!r}")
    try:
        Workload.parse(workload)
    except InvalidProblemError as exc:
        msg = str(exc)
        if repr(workload.strip()) not in msg:  # parse names the text only when it is not Ms
            msg = f"workload={workload!r}: {msg}"
        raise InvalidProblemError(msg) from None


def as_device(device: torch.device | str | int) -> torch.device:
    """`device` as a torch.device, a CUDA one with its index (the current card when none is
    given). Checked before anything moves: without CUDA torch answers a move with an
    AssertionError ("Torch not compiled with CUDA enabled"), and a bad index faults later."""
    try:
        if isinstance(device, int) and not isinstance(device, bool):
            dev = torch.device("cuda", device)
        else:
            dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidTensorError(
            f"device={device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1' or a GPU index)") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"device={device!r}: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    n = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= n:
        raise CudaUnavailableError(f"device={device!r}: GPU {dev.index} does not exist ({n} visible)")
    return dev


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file `path` names: the file itself, or in a folder its `model.safetensors`
    or its only `*.safetensors` file. Anything else raises InvalidTensorError naming the path
    (safetensors says "No such device" of a folder)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        files = sorted(q for q in p.glob("*.safetensors") if q.is_file())
        if len(files) == 1:
            return files[0]
        held = "no .safetensors file" if not files else (
            f"{len(files)} .safetensors files ({', '.join(q.name for q in files[:3])}"
            f"{', ...' if len(files) > 3 else ''})")
        raise InvalidTensorError(f"{p} is a folder holding {held}: give the .safetensors file, not the folder")
    if not p.exists():
        raise InvalidTensorError(f"checkpoint {p} does not exist")
    return p


def open_safetensors(path: Path, device: str = "cpu") -> Any:
    """`safe_open(path)`, its errors typed: a file that is not safetensors (its header does
    not parse) or cannot be read raises InvalidTensorError naming the path."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device=device)
    except SafetensorError as exc:
        raise InvalidTensorError(f"{path} is not a safetensors file ({exc})") from None
    except OSError as exc:
        raise InvalidTensorError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def band_edges(bands: Sequence[Band[Any]]) -> tuple[int, ...]:
    """`m_hi` of every band but the last: band `bisect_left(edges, m)` serves M (how `forward`
    picks its plan; bands are contiguous from M = 1 and the last has no upper edge)."""
    edges = tuple(int(b.m_hi) for b in bands[:-1] if b.m_hi is not None)
    if len(edges) != len(bands) - 1 or bands[-1].m_hi is not None:
        raise ValueError("bands must run from M = 1 with only the last one open")
    return edges


def _band_ms(band: Band[KernelConfig]) -> tuple[int, ...]:
    """Ms to compile `band`'s fused kernels for: its Ms up to its threshold, cut where the row
    instance stops changing (`max_q_gemm_rows_kernel`: every larger M uses the same one), plus
    the top fused M; one M above the threshold when it only reconstructs."""
    cfg = band.config
    top = cfg.max_q_gemm_rows if band.m_hi is None else min(band.m_hi, cfg.max_q_gemm_rows)
    if top < band.m_lo:
        return (band.m_lo,)
    return (*range(band.m_lo, min(top, max(band.m_lo, cfg.max_q_gemm_rows_kernel)) + 1), top)


def _validate_sym(t: GPTQTensors) -> None:
    z = zeros(t)
    mid = 1 << (t.bits - 1)
    if not bool((z == mid).all()):
        raise InvalidTensorError(
            f"quantization_config says sym=True but the zeros are not all {mid} (found "
            f"{int(z.min())}..{int(z.max())}): wrong checkpoint_format (gptq vs gptq_v2)?")


class QuantLinear(nn.Module):
    """`y = x @ dequant(W) + bias` with GPTQ weights; a drop-in for `nn.Linear(K, N)`.

    Build with :meth:`from_gptq_tensors` or :meth:`from_safetensors`, or construct empty and
    `load_state_dict` a GPTQ layer's tensors. `config` (a KernelConfig or preset name) pins the
    config; otherwise it is looked up (see `gemmtune.runtime.lookup`) for `workload`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int = 128, bias: bool = True, zero_format: ZeroFormat = "v1",
                 config: KernelConfig | str | None = None,
                 workload: Workload | str | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        Problem(in_features, out_features, bits, group_size)  # validates shape rules
        if zero_format not in ("v1", "v2"):
            raise InvalidProblemError(f"zero_format={zero_format!r} must be 'v1' or 'v2'")
        check_config(config)
        check_workload(workload)
        if device is not None:
            as_device(device)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.zero_format: ZeroFormat = zero_format
        self.requested_config = config
        self.workload = workload
        g = 1 if group_size == -1 else in_features // group_size
        # Placeholders until load_state_dict / from_* fill them (like AutoGPTQ's QuantLinear);
        # device="meta" allocates nothing for modules about to receive real tensors.
        kw: dict[str, Any] = {"device": device}
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features,
                                                    dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(g, out_features * bits // 32, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(g, out_features, dtype=torch.float16, **kw))
        rows = torch.arange(in_features, dtype=torch.int32, **kw)
        self.register_buffer("g_idx", torch.zeros_like(rows) if group_size == -1 else rows // group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw) if bias else None)
        self._op_handle = ops.register(self)
        self._qw: Any = None
        """The kernel layout (QuantizedWeight) once prepared on CUDA; while set it is the only
        copy of the weight and the GPTQ_BUFFERS are None. In a fused group: a column view of
        the group's layout."""
        self._group: FusedGroup | None = None
        """The fused group this layer runs in (runtime/fusion.py), if any."""
        self._member = -1
        """This layer's index (column order) in `_group`."""
        self._invalidate()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_gptq_tensors(cls, t: GPTQTensors, bias: torch.Tensor | None = None,
                          config: KernelConfig | str | None = None,
                          workload: Workload | str | None = None) -> QuantLinear:
        """Wrap one layer's tensors (they are copied in; `bias` keeps its dtype)."""
        t.validate()
        if bias is not None and tuple(bias.shape) != (t.n,):
            raise InvalidTensorError(f"bias must have shape ({t.n},), got {tuple(bias.shape)}")
        m = cls(t.k, t.n, t.bits, t.group_size, bias=bias is not None, zero_format=t.zero_format,
                config=config, workload=workload, device="meta")
        dev = t.qweight.device
        m.qweight = t.qweight.detach().clone()
        m.qzeros = t.qzeros.detach().clone()
        m.scales = t.scales.detach().clone()
        m.g_idx = (t.g_idx if t.g_idx is not None else t.trivial_g_idx()).detach().clone()
        m.bias = None if bias is None else bias.detach().to(dev).clone()
        m._invalidate()
        return m

    @classmethod
    def from_safetensors(cls, path: str | Path, prefix: str, quantization_config: Mapping[str, Any] | Any,
                         config: KernelConfig | str | None = None,
                         workload: Workload | str | None = None,
                         device: str | torch.device = "cpu") -> QuantLinear:
        """Load layer `prefix` (e.g. `model.layers.0.mlp.down_proj`) from a safetensors file,
        reading only its tensors. `quantization_config` is the checkpoint's (GPTQ or AWQ); `path`
        may be a folder holding one safetensors file (`checkpoint_file`)."""
        check_config(config)
        check_workload(workload)
        as_device(device)
        path = checkpoint_file(path)
        spec = read_format(quantization_config)
        names = {n: f"{prefix}.{n}" for n in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        got: dict[str, torch.Tensor] = {}
        with open_safetensors(path, str(device)) as f:
            keys = set(f.keys())
            for short, full in names.items():
                if full in keys:
                    got[short] = f.get_tensor(full)
        missing = [n for n in ("qweight", "qzeros", "scales") if n not in got]
        if missing:
            raise InvalidTensorError(f"{path}: no tensor {prefix}.{missing[0]} (is {prefix!r} a quantized layer?)")
        return cls.from_checkpoint_tensors(got, spec, config=config, workload=workload)

    @classmethod
    def from_checkpoint_tensors(cls, tensors: Mapping[str, torch.Tensor], spec: QuantFormat,
                                config: KernelConfig | str | None = None,
                                workload: Workload | str | None = None) -> QuantLinear:
        """From a layer's checkpoint tensors by name (`qweight`, `qzeros`, `scales`, optional
        `g_idx`, `bias`) and the checkpoint's format (`read_format` of its quantization_config).
        AWQ layers are converted to the GPTQ layout here, once."""
        check_layout(spec.method, tensors["qweight"], tensors["qzeros"], tensors["scales"])
        if spec.method == "awq":
            a = AWQTensors(tensors["qweight"].contiguous(), tensors["qzeros"].contiguous(),
                           tensors["scales"].to(torch.float16).contiguous(), spec.group_size,
                           spec.bits).validate()
            return cls.from_awq_tensors(a, tensors.get("bias"), config=config, workload=workload)
        g_idx = tensors.get("g_idx")
        if spec.desc_act and g_idx is None:
            raise InvalidTensorError("quantization_config says desc_act=True but the layer has no g_idx")
        t = GPTQTensors(tensors["qweight"].contiguous(), tensors["qzeros"].contiguous(),
                        tensors["scales"].to(torch.float16).contiguous(),
                        None if g_idx is None else g_idx.to(torch.int32).contiguous(),
                        spec.bits, spec.group_size, spec.zero_format).validate()
        if spec.sym:
            _validate_sym(t)
        return cls.from_gptq_tensors(t, tensors.get("bias"), config=config, workload=workload)

    @classmethod
    def from_awq_tensors(cls, a: AWQTensors, bias: torch.Tensor | None = None,
                         config: KernelConfig | str | None = None,
                         workload: Workload | str | None = None) -> QuantLinear:
        """Wrap one AWQ GEMM layer: repacked to the GPTQ layout (zeros as stored, `v2`), so the
        module's buffers and `state_dict` are GPTQ's from here on."""
        return cls.from_gptq_tensors(to_gptq(a), bias, config=config, workload=workload)

    # -- the GPTQ view -------------------------------------------------------------------------
    def gptq_tensors(self) -> GPTQTensors:
        """The layer's tensors as GPTQTensors on its device: views of the buffers, or, once
        prepared on CUDA, new tensors rebuilt from the kernel layout (edits do not reach the
        layer then; `load_state_dict` does)."""
        if self._qw is not None:
            return self._qw.gptq_tensors()
        return GPTQTensors(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                           self.group_size, self.zero_format)

    @property
    def device(self) -> torch.device:
        """Where the layer's weight lives (the kernel layout's device once prepared)."""
        qw = self._qw
        return qw.device if qw is not None else self.qweight.device

    def packed_bytes(self) -> int:
        """The checkpoint's bytes of this weight: packed qweight and zeros, fp16 scales."""
        return packed_bytes(Problem(self.in_features, self.out_features, self.bits, self.group_size))

    def resident_bytes(self) -> int:
        """Bytes this layer holds for its weight on `device`: the kernel layout once prepared
        on CUDA (else the GPTQ buffers), plus any dense weight the reference path cached. The
        bias is not counted (the same in every form)."""
        if self._qw is not None:
            total = self._qw.nbytes()
        else:
            total = sum(b.numel() * b.element_size() for b in (self.qweight, self.qzeros, self.scales, self.g_idx))
        if self._group is not None:  # its rows of the group's cached dense weights
            total += self._group.dense_bytes(self._member)
        return total + sum(w.numel() * w.element_size() for w in self._dense.values())

    @property
    def fused_group(self) -> FusedGroup | None:
        """The group whose one GEMM computes this layer with its siblings (None: runs alone)."""
        return self._group

    @property
    def problem(self) -> Problem:
        return Problem(self.in_features, self.out_features, self.bits, self.group_size,
                       self._act_order())

    def _act_order(self) -> bool:
        if self._act is None:
            qw = self._qw
            self._act = qw.problem.act_order if qw is not None else self.gptq_tensors().act_order
        return self._act

    # -- state that follows the buffers --------------------------------------------------------
    def _invalidate(self) -> None:
        """Drop everything derived from the weight: plans, bands, caches (called when the
        buffers move or are reloaded, or to re-resolve the config). The kernel layout, when it
        holds the weight, is the weight itself and stays (`_unhold` gives it up)."""
        self._plan: Any = None  # dispatch Plan of the last band (None: not prepared)
        self._plans: tuple[Any, ...] = ()  # one Plan per band, in M order
        self._edges: tuple[int, ...] = ()  # band_edges: bisect_left(_edges, M) -> band
        self.bands: tuple[Band[KernelConfig], ...] = ()
        """The M bands this layer runs with (resolved at prepare); `lookup_result` is the last."""
        self._bias16: torch.Tensor | None = None
        self._dense: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._dense_version: tuple[int, ...] = ()
        self._act: bool | None = None
        self.lookup_result: LookupResult | None = None

    def _buffer_ids(self) -> tuple[int, ...]:
        return tuple(id(b) for b in (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias))

    # -- one copy of the weight: the kernel layout holds it once prepared ---------------------
    def _hold(self, qw: Any) -> None:
        """Make `qw` the only copy of the weight: the GPTQ buffers are emptied (the caller
        holds no other reference, so their memory is freed now)."""
        self._qw = qw
        for name in GPTQ_BUFFERS:
            self._buffers[name] = None
        self._act = qw.problem.act_order
        self._dense, self._dense_version = {}, ()

    def _unhold(self) -> None:
        """Put the GPTQ tensors back into the buffers (rebuilt from the kernel layout, on its
        device) and drop the layout and everything derived from it; no-op when not held. In
        a fused group the group's engine goes too (this member's weight is about to change or
        move); the siblings keep their views."""
        qw = self._qw
        if qw is None:
            return
        t = qw.gptq_tensors()
        self._buffers.update(qweight=t.qweight, qzeros=t.qzeros, scales=t.scales, g_idx=t.g_idx)
        self._qw = None
        if self._group is not None:
            self._group.reset()
        self._invalidate()

    def _adopt(self, view: Any) -> None:
        """Hold `view` (the group's columns of this layer) as the weight; what the layer had
        prepared alone is dropped (the group runs it now)."""
        self._hold(view)
        self._plan, self._plans, self._edges, self._bias16 = None, (), (), None

    def _prepared(self) -> bool:
        """Ready to run on CUDA without preparing: its own plans, or its group's engine."""
        g = self._group
        return self._plan is not None or (g is not None and g.serves(self))

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        """`.to()` / `.cuda()` / `.half()` move the buffers; keep scales fp16 (format data, not
        compute dtype), drop what was derived from the old buffers and prepare on CUDA.

        A prepared layer keeps its kernel layout when `fn` leaves tensors of its device there
        (a dtype cast, `.cuda()` on the same card): only the bias follows `fn`. A move
        elsewhere rebuilds the GPTQ tensors (one layer at a time) and moves those."""
        qw = self._qw
        if qw is not None and fn(torch.empty(0, dtype=torch.int32, device=qw.device)).device != qw.device:
            self._unhold()
        before = self._buffer_ids()
        super()._apply(fn, recurse)  # None buffers (a held weight's) are skipped
        if self.scales is not None and self.scales.dtype != torch.float16:
            self.scales = self.scales.to(torch.float16)
        if self._buffer_ids() != before:
            self._invalidate()
        if self.device.type == "cuda" and (not self._prepared() or self._group is not None):
            self._prepare_moved()
        return self

    def _prepare_moved(self) -> None:
        """Prepare after a move or a copy: a fused group's member waits for its siblings (the
        last to reach the device builds the group's one layout) instead of building a layout of
        its own that the group would replace a moment later."""
        g = self._group
        if g is not None:
            if g.prepare(self, wait=True):
                return
            members = g.members()
            if g.arriving() or (members is not None and any(m.device != self.device for m in members)):
                return  # a sibling is still elsewhere (or not yet copied): it builds the group
        self.prepare()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """A held weight's GPTQ tensors are rebuilt for the state dict, on the host: a whole
        model's state dict then never needs its weights twice on the GPU."""
        qw = self._qw
        if qw is None:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        t = qw.gptq_tensors("cpu")
        self._buffers.update(qweight=t.qweight, qzeros=t.qzeros, scales=t.scales, g_idx=t.g_idx)
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            for name in GPTQ_BUFFERS:
                self._buffers[name] = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (`copy.deepcopy`, pickling) carry the GPTQ tensors (rebuilt when held, on the
        layer's device) and nothing derived from them; a copy of a prepared layer prepares
        itself (`__setstate__`)."""
        state = super().__getstate__()
        state["_prepare_on_load"] = self._prepared()
        qw = self._qw
        if qw is not None:
            t = qw.gptq_tensors()
            rebuilt = {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": t.g_idx}
            state["_buffers"] = {k: rebuilt.get(k, v) for k, v in self._buffers.items()}
        state.update(_qw=None, _plan=None, _plans=(), _edges=(), bands=(), _bias16=None, _dense={},
                     _dense_version=(), lookup_result=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies (`copy.deepcopy`, pickling) are other layers: each gets its own op handle, or a
        compiled copy would run the original's weights."""
        prepare = bool(state.pop("_prepare_on_load", False))
        super().__setstate__(state)
        self._op_handle = ops.register(self)
        if "_qw" not in self.__dict__:  # pickled before layers held their weight
            self._qw = None
        if "_group" not in self.__dict__:  # pickled before groups existed
            self._group, self._member = None, -1
        if self._group is not None:  # the copied group (shared by the copied siblings)
            self._group._register(self, self._member)
        self._invalidate()
        if prepare and self.device.type == "cuda":
            self._prepare_moved()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # torch copies into the buffers, so a held weight is rebuilt into them first (tensors
        # the state dict lacks keep their values), and the old layout is freed before the new
        # one is built: at most about two copies of this one layer at a time.
        was_prepared = self._prepared() or self._qw is not None
        self._unhold()
        super()._load_from_state_dict(*args, **kwargs)
        self._invalidate()
        if was_prepared and self.device.type == "cuda":
            self.prepare()

    # -- preparation ---------------------------------------------------------------------------
    def prepare(self, device: torch.device | str | int | None = None) -> LookupResult | None:
        """Build the kernel-ready weight, resolve the config and compile its kernels (CUDA), so
        `forward` does none of it. Returns the lookup result (None for CPU / non-kernel bits)."""
        if device is not None:
            dev = as_device(device)
            if dev != self.device:
                self.to(dev)  # _apply prepares
                return self.lookup_result
        dev = self.device
        if dev.type != "cuda":
            return None
        if not self.problem.has_kernel:
            self._bias16 = None if self.bias is None else self.bias.to(torch.float16)
            return None  # no CUDA kernel: forward uses the dense reference on the GPU
        g = self._group
        if g is not None and g.prepare(self):
            return self.lookup_result  # the group's engine, resolved for the fused problem
        return self._prepare_alone(dev)

    def _prepare_alone(self, dev: torch.device) -> LookupResult | None:
        """`prepare` for this layer's own problem and layout (a group's view is not one)."""
        from gemmtune.kernels.dispatch import plan_for
        from gemmtune.kernels.weights import QuantizedWeight

        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        # The M bands of the one resolver (gemmtune.db.resolve): one Plan per band, compiled
        # for the Ms its band serves (plan_for shares one Plan among bands of equal config).
        bands = resolve(device_info(idx), self.problem, self.workload,
                        config=self.requested_config).bands
        edges = band_edges(bands)
        # A held layout is reused: it does not depend on the config, so re-preparing (another
        # config, a re-tune picked up) allocates no weight memory.
        own = self._qw is not None and self._qw.view_of is None
        qw = self._qw if own else QuantizedWeight(self.gptq_tensors(), torch.device("cuda", idx))
        plans = tuple(plan_for(qw, b.config) for b in bands)
        for band, plan in zip(bands, plans, strict=True):
            plan.prepare(_band_ms(band))
        res = LookupResult.of(bands[-1])
        if qw is not self._qw:
            self._hold(qw)  # only now: a failed preparation leaves the weight as it was
        self._plans, self._edges, self.bands = plans, edges, tuple(bands)
        self._plan, self.lookup_result = plans[-1], res
        self._bias16 = None if self.bias is None else self.bias.to(torch.float16).contiguous()
        return res

    @property
    def config(self) -> KernelConfig | None:
        """The config in use (None until prepared on CUDA)."""
        return None if self.lookup_result is None else self.lookup_result.config

    @property
    def config_source(self) -> str | None:
        return None if self.lookup_result is None else self.lookup_result.source

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # dynamo cannot trace the kernel launch or the dense cache: one opaque op instead
            # (a fused group's: one op for all its members, runtime/fusion.py).
            g = self._group
            if g is not None:
                return g.traced_member(self, x)
            return ops.quant_linear(x, self._op_handle, self.out_features)
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's computation (what `gemmtune::quant_linear` runs when compiled); in a
        fused group, its columns of the group's one GEMM (a column view of it)."""
        g = self._group
        if g is not None:
            if x.shape[-1] != self.in_features:
                raise InvalidTensorError(
                    f"input last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}")
            return g.member_forward(self, x)
        return self._forward_alone(x)

    def _forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's own GEMM, group or not."""
        if x.shape[-1] != self.in_features:
            raise InvalidTensorError(
                f"input last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        plan = self._plan
        if plan is not None and x.device == self._qw.device:
            if x.dtype is torch.float16:
                if not x.is_contiguous():
                    x = x.contiguous()
                if x.data_ptr() % 16:  # a view into the middle of a tensor: kernels need 16 B
                    x = x.clone()
                if self._edges:  # a plan over M bands: the band of this M
                    plan = self._plans[bisect_left(self._edges, x.numel() // self.in_features)]
                out = plan(x)
                if self._bias16 is not None:
                    out.add_(self._bias16)
                return out
            out = self._forward_alone(x.to(torch.float16))
            return out.to(x.dtype)
        dev = self.device
        if x.is_cuda and dev.type == "cuda" and self.bits in KERNEL_BITS:  # Problem.has_kernel, without a Problem per call
            if x.device != dev:
                raise InvalidTensorError(f"input is on {x.device}, layer on {dev}")
            self._prepare_alone(dev)
            return self._forward_alone(x)
        return self._forward_dense(x)

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: dequantize once (cached per device and dtype), `F.linear`. Half
        precision on CPU computes in fp32 and rounds back, like the oracle."""
        if x.device != self.device:
            raise InvalidTensorError(f"input is on {x.device}, layer on {self.device}")
        if not x.dtype.is_floating_point:
            raise InvalidTensorError(f"input must be a floating tensor, got {x.dtype}")
        work = x.dtype
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            work = torch.float32
        w = self._dense_weight(x.device, work)
        b = None if self.bias is None else self.bias.to(work)
        out = F.linear(x.to(work), w, b)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _weight_version(self) -> tuple[Any, ...]:
        """Changes whenever the weight may have: the buffers' version counters (in-place edits),
        or the held layout's identity (a held layout changes only through _hold / _unhold)."""
        if self._qw is not None:
            return (id(self._qw),)
        return tuple(b._version for b in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def _dense_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        version = self._weight_version()
        if version != self._dense_version:
            self._dense = {}
            self._dense_version = version
            self._act = None
        key = (device, dtype)
        w = self._dense.get(key)
        if w is None:
            w = self._dequantized(device, dtype)
            self._dense[key] = w
        return w

    def _dequantized(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [N, K] (nn.Linear's), dequantized on the host by the reference."""
        from gemmtune.kernels.reference import dequantize

        t = self.gptq_tensors()
        if t.device.type != "cpu":
            t = t.to("cpu")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return dequantize(t, work).t().contiguous().to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        act = ", act_order=True" if self._act_order() else ""
        if self.lookup_result is not None:
            cfg = f"config={self.lookup_result.config.key()} (source: {self.lookup_result.source})"
            if len(self.bands) > 1:  # the plan over M bands, the last one is `config`
                cfg += ", bands=" + "; ".join(
                    f"{b.span}: {b.config.key()} ({b.source}"
                    + (f", {b.workload_key}" if b.workload_key else "") + ")" for b in self.bands)
        elif self.device.type == "cuda" and not self.problem.has_kernel:
            cfg = "config=none (no CUDA kernel for this bit width: dense reference path)"
        elif self.device.type == "cuda":
            cfg = "config=unresolved (resolved at prepare / first forward)"
        else:
            cfg = "config=none (CPU: reference path)"
        fused = "" if self._group is None else f", fused={self._group.problem.key()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}{act}, "
                f"bias={self.bias is not None}, zero_format={self.zero_format}{fused}, {cfg}")
