"""One copy of the weights on the GPU (issue 21), measured with torch's allocator.

- 28 QuantLinears of Llama-2-13B shapes (4 decoder layers) prepared by `.cuda()` hold their
  kernel layout and nothing else: allocated bytes = the layouts' bytes <= 1.05 x packed bytes;
- re-preparing every layer (another config, `load_state_dict`, a move away and back) with the
  cyclic GC off leaves the allocation at that one-copy figure, and deleting the layers frees it
  all: no reference cycle holds a weight;
- a GPTQ checkpoint streams into a model built on `meta`, and a host model streams to the GPU
  (`patch(..., device=)`, `.cuda()`), with peak memory within about one layer of the final size;
- what a layer rebuilds from the layout (state dict, `.cpu()`, copies) is the checkpoint's
  tensors bit for bit, and a CUDA graph captured after re-preparing replays the right product.

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_weight_residency_gpu.py -s`
(`-s` shows the measured figures, lines starting with `RESIDENCY`).
"""

from __future__ import annotations

import copy
import gc
import io
import json
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from gemmtune.kernels import PRESETS, Problem, reference
from gemmtune.kernels.awq import random_awq, to_gptq
from gemmtune.kernels.gptq import GPTQTensors, random_gptq
from gemmtune.kernels.weights import packed_bytes
from gemmtune.runtime import QuantLinear, describe, load_quantized, patch
from gemmtune.runtime.quant_linear import GPTQ_BUFFERS
from torch import nn

from tests.gpu_util import activations, capture, layer, reference_product, requires_gpu
from tests.test_weight_residency import assert_same_tensors

pytestmark = [pytest.mark.gpu, requires_gpu, pytest.mark.usefixtures("fresh_runtime")]

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER = 5120, 13824  # Llama-2-13B
DECODER = (("q_proj", HIDDEN, HIDDEN), ("k_proj", HIDDEN, HIDDEN), ("v_proj", HIDDEN, HIDDEN),
           ("o_proj", HIDDEN, HIDDEN), ("gate_proj", HIDDEN, INTER), ("up_proj", HIDDEN, INTER),
           ("down_proj", INTER, HIDDEN))
LARGEST = packed_bytes(Problem(HIDDEN, INTER))  # one 5120 x 13824 4-bit g128 layer
# Allocator rounding: small tensors take 512 B, and a block carved from a fresh segment is not
# split when less than 1 MB would remain. A second copy of the weights would be ~650 MB.
SLACK = 32 * 2**20


def report(what: str, **figures: Any) -> None:
    print(f"RESIDENCY {what}: " + json.dumps(figures), flush=True)


def _workspace_bytes() -> int:
    """Bytes of the per-device kernel scratch (shared by every layer, grows only)."""
    from gemmtune.kernels.workspace import _workspaces

    ws = _workspaces.get(torch.cuda.current_device())
    if ws is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (ws.partials, ws.counters, ws.dequant, *ws.retired))


def _allocated() -> int:
    """Bytes torch has allocated on the GPU, less the kernel scratch."""
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - _workspace_bytes()


def _cuda_tensors() -> dict[int, str]:
    """Python-visible CUDA tensors now alive, id -> 'shape dtype' (to name what a figure holds)."""
    return {id(o): f"{tuple(o.shape)} {o.dtype}" for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.is_cuda}


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def bases() -> dict[str, GPTQTensors]:
    """One random checkpoint layer per projection of a 13B decoder (host tensors)."""
    return {name: random_gptq(k, n, 4, 128, False, "v1", generator=torch.Generator().manual_seed(k + n + i))
            for i, (name, k, n) in enumerate(DECODER)}


def test_13b_layers_hold_one_copy_and_re_preparing_frees_the_old_one_at_once(bases: dict[str, GPTQTensors]) -> None:
    with no_cyclic_gc():
        start = _allocated()
        before = _cuda_tensors()
        layers = nn.ModuleList()
        for _ in range(4):  # 4 decoder layers: 28 QuantLinears
            for name, *_ in DECODER:
                layers.append(QuantLinear.from_gptq_tensors(bases[name]).cuda())  # one at a time
        packed = sum(q.packed_bytes() for q in layers)
        resident = sum(q.resident_bytes() for q in layers)
        held = _allocated() - start
        assert all(q._qw is not None and all(getattr(q, n) is None for n in GPTQ_BUFFERS) for q in layers)
        assert abs(held - resident) <= SLACK, (held, resident)  # nothing beside the layouts
        assert held <= 1.05 * packed
        rep = describe(layers)
        assert rep.resident_bytes() == resident and rep.packed_bytes() == packed
        report("after .cuda()", layers=len(layers), packed=packed, allocated=held, ratio=held / packed,
               describe=rep.memory())

        for q in layers:  # another config: new plans over the same layout
            q.requested_config = "exllamav2-0.0.12"
            q.prepare()
            assert q.config == PRESETS["exllamav2-0.0.12"]
        after_config = _allocated() - start
        for q in layers:  # a reload: a new layout, the old one freed before it is built
            q.load_state_dict(q.state_dict())
        after_reload = _allocated() - start
        for q in list(layers)[:7]:  # away and back: rebuilt, moved, prepared again
            q.cpu()
            assert q._qw is None and q.qweight.device.type == "cpu"
            q.cuda()
        after_move = _allocated() - start
        report("re-prepared with the cyclic GC off", config=after_config / packed,
               load_state_dict=after_reload / packed, cpu_and_back=after_move / packed)
        for figure in (after_config, after_reload, after_move):
            assert abs(figure - held) <= SLACK, (figure, held)

        del layers, q, rep
        gone = _allocated() - start
        left = [v for k, v in _cuda_tensors().items() if k not in before]
        report("layers deleted with the cyclic GC off", allocated=gone, tensors_left=left[:8])
        assert gone <= SLACK
    gc.collect()
    assert _allocated() - start <= SLACK


def test_a_weight_dies_with_its_last_reference_not_at_the_next_gc() -> None:
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    t = layer(4096, 1024, 4, 128, True, seed=3)
    with no_cyclic_gc():
        start = _allocated()
        qw = QuantizedWeight(t, "cuda")
        plans = [plan_for(qw, PRESETS[name]) for name in ("default", "exllamav2-0.0.12")]
        assert all(p.weight is qw for p in plans)
        ref = weakref.ref(qw)
        del qw
        assert ref() is None  # no cycle: gone now; the plans still hold the tensors they run
        assert all(p.weight is None for p in plans) and _allocated() - start > 0
        a = activations(3, 4096, seed=4)
        assert reference.relative_error(plans[0](a), reference_product(a, t)) < reference.fp16_tolerance(4096)
        del plans, a
        assert _allocated() - start <= SLACK


@pytest.mark.parametrize(("zf", "act", "bits"), [("v1", True, 4), ("v2", False, 4), ("v1", False, 8), ("v2", True, 8)])
def test_what_a_gpu_layer_gives_back_is_the_checkpoint_bit_for_bit(zf: str, act: bool, bits: int) -> None:
    t = layer(2048, 1024, bits, 128, act, zf, seed=bits + act)
    q = QuantLinear.from_gptq_tensors(t, torch.randn(1024, dtype=torch.float16)).cuda()
    assert q._qw is not None and q.qweight is None
    a = activations(5, 2048, seed=7)
    want = reference_product(a, t) + q.bias.float()

    def right(out: torch.Tensor) -> bool:  # split-K sums in float atomics: not bit-reproducible
        return reference.relative_error(out, want) < reference.fp16_tolerance(2048)

    assert right(q(a))
    sd = q.state_dict()
    assert all(sd[n].device.type == "cpu" for n in GPTQ_BUFFERS)  # saved through the host
    assert_same_tensors(GPTQTensors(sd["qweight"], sd["qzeros"], sd["scales"], sd["g_idx"], bits, 128, zf), t)
    assert_same_tensors(q.gptq_tensors().to("cpu"), t)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
        assert twin._qw is not None and twin.qweight is None and twin._qw is not q._qw  # prepared, its own
        assert right(twin(a))
    q.cpu()
    assert_same_tensors(q.gptq_tensors(), t)
    q.cuda()
    assert right(q(a))


def test_an_awq_layer_on_the_gpu_gives_back_its_documented_gptq_tensors() -> None:
    aw = random_awq(2048, 512, 128, generator=torch.Generator().manual_seed(8))
    q = QuantLinear.from_awq_tensors(aw).cuda()
    assert q._qw is not None
    sd = q.state_dict()
    want = to_gptq(aw)
    assert_same_tensors(GPTQTensors(sd["qweight"], sd["qzeros"], sd["scales"], None, 4, 128, "v2"),
                        GPTQTensors(want.qweight, want.qzeros, want.scales, None, 4, 128, "v2"))


def test_a_graph_captured_after_re_preparing_replays_the_right_product() -> None:
    t = layer(4096, 2048, 4, 128, True, seed=9)
    q = QuantLinear.from_gptq_tensors(t).cuda()
    q.requested_config = "exllamav2-0.0.12"
    q.prepare()
    q.load_state_dict(q.state_dict())  # and a new layout
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for m in (4, 64):  # fused and reconstruct paths
        static_in = activations(m, 4096, seed=10 + m)
        g, static_out = capture(lambda x=static_in: q(x))
        for seed in (1, 2):
            a = activations(m, 4096, seed=20 + seed + m)
            static_in.copy_(a)
            static_out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert not torch.isnan(static_out).any()
            assert reference.relative_error(static_out, reference_product(a, t, w_ref)) < reference.fp16_tolerance(4096)


# -- streaming loads -------------------------------------------------------------------------------

QC = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
      "checkpoint_format": "gptq"}
VOCAB = 1024


def llama_13b_config(layers: int) -> Any:
    import transformers

    return transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=40,
                                    num_key_value_heads=40, num_hidden_layers=layers, vocab_size=VOCAB,
                                    max_position_embeddings=512, tie_word_embeddings=False)


def write_checkpoint(path: str, layers: int) -> None:
    """A random GPTQ checkpoint of `layers` Llama-2-13B decoder layers (run in a subprocess by
    the test, so the host memory it takes is not the test process's)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).half(),
        "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).half(),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16)}
    for i in range(layers):
        pre = f"model.layers.{i}"
        state[f"{pre}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        state[f"{pre}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        for name, k, n in DECODER:
            t = random_gptq(k, n, 4, 128, False, "v1", generator=gen)
            t = GPTQTensors(t.qweight, t.qzeros, (t.scales.float() * 0.05).half(), t.g_idx, 4, 128, "v1")
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            for field in ("qweight", "qzeros", "scales", "g_idx"):
                state[f"{pre}.{part}.{name}.{field}"] = getattr(t, field)
    save_file(state, path)
    (Path(path).parent / "config.json").write_text(json.dumps({"quantization_config": QC}))


class HostPeak:
    """Peak anonymous host memory (RssAnon: not the file pages safetensors maps) of this
    process while in use, sampled every 2 ms; `None` where /proc does not report it."""

    def __init__(self) -> None:
        self.base = self._read()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            now = self._read()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __enter__(self) -> HostPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int | None:
        return None if self.base is None or self.peak is None else self.peak - self.base


def _measure_load(load: Callable[[], Any]) -> tuple[int, int, HostPeak]:
    """(peak - final, final - start) GPU bytes of `load()` (scratch included: it is part of
    what a loaded model holds), and its host memory."""
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with HostPeak() as host:
        load()
    torch.cuda.synchronize()
    final = torch.cuda.memory_allocated()
    return torch.cuda.max_memory_allocated() - final, final - start, host


def test_a_13b_checkpoint_streams_into_a_model_built_on_meta(tmp_path: Path) -> None:
    import transformers

    layers = 6  # 42 layers, ~1 GB of GPTQ weights: a non-streaming load would peak ~1 GB above
    path = tmp_path / "model.safetensors"
    subprocess.run([sys.executable, "-c", "from tests.test_weight_residency_gpu import write_checkpoint; "
                    f"write_checkpoint({str(path)!r}, {layers})"], cwd=ROOT, check=True)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # as transformers builds an fp16 model: rotary stays fp32
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(llama_13b_config(layers)).eval()
    finally:
        torch.set_default_dtype(prev)
    over, final, host = _measure_load(lambda: load_quantized(model, path, device="cuda"))
    rep = describe(model)
    packed = rep.packed_bytes()
    report("load_quantized 13B x6 from meta", packed=packed, resident=rep.resident_bytes(),
           final_allocated=final, peak_over_final=over, largest_layer=LARGEST, host_growth=host.growth,
           memory=rep.memory())
    assert len(rep) == 7 * layers and rep.resident_bytes() <= 1.05 * packed
    assert over <= 3 * LARGEST + 32 * 2**20 and over <= 2**30
    if host.growth is not None:  # the checkpoint (~1 GB) never sits in host memory at once
        assert host.growth <= 3 * LARGEST + 256 * 2**20
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(llama_13b_config(layers))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.cpu(), rope.inv_freq, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (1, 8), device="cuda")).logits
    assert torch.isfinite(logits.float()).all()


class Foreign(nn.Module):
    """An AutoGPTQ-style module holding a checkpoint layer (what `patch` replaces)."""

    def __init__(self, t: GPTQTensors) -> None:
        super().__init__()
        self.bits, self.group_size = t.bits, t.group_size
        for name in GPTQ_BUFFERS:
            self.register_buffer(name, getattr(t, name).clone())


@pytest.mark.parametrize("how", ["patch(device=cuda)", "patch, then .cuda()"])
def test_a_host_model_streams_to_the_gpu(bases: dict[str, GPTQTensors], how: str) -> None:
    model = nn.Sequential(*[Foreign(bases[name]) for _ in range(2) for name, *_ in DECODER],
                          nn.LayerNorm(HIDDEN))

    def load() -> None:
        if how == "patch(device=cuda)":
            patch(model, device="cuda")
        else:
            patch(model)
            assert all(m.device.type == "cpu" for m in model if isinstance(m, QuantLinear))
            model.cuda()

    over, final, _ = _measure_load(load)
    rep = describe(model)
    report(f"host model, {how}", packed=rep.packed_bytes(), resident=rep.resident_bytes(),
           final_allocated=final, peak_over_final=over)
    assert len(rep) == 14 and all(r.device == "cuda:0" for r in rep)
    assert rep.resident_bytes() <= 1.05 * rep.packed_bytes()
    assert over <= 3 * LARGEST + 32 * 2**20
    assert model[-1].weight.is_cuda
