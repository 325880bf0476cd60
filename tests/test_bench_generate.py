"""bench/generate.py without a GPU: its command line, the real architectures' dimensions, the
random GPTQ model, the static-cache functions it compiles, and the report it renders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.runtime import GPTQSpec, QuantLinear

from tests.tiny_llama import tiny_llama_config

transformers = pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "generate.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_help_and_defaults(gen: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gen.main(["--help"])
    assert exc.value.code == 0 and "--report" in capsys.readouterr().out
    a = gen.parse_args([])
    assert (a.model, a.rows, a.batches, a.prompt) == (
        ["llama-2-13b", "llama-3-8b"], ["fp16", "default", "exllamav2-0.0.12", "tuned"], [1, 4, 16], 512)
    small = gen.parse_args(["--model", "llama-2-13b", "--batches", "1", "--rows", "fp16,tuned",
                            "--db", "x.db", "--no-tune"])
    assert (small.model, small.batches, small.rows, small.no_tune) == (["llama-2-13b"], [1], ["fp16", "tuned"], True)


@pytest.mark.parametrize("argv", [["--model", "llama-9"], ["--rows", "fp32"], ["--batches", "0"],
                                  ["--no-tune"], ["--steps", "0"]])
def test_bad_arguments_are_usage_errors(gen: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gen.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("name,params,shapes", [
    ("llama-2-13b", 13_015_864_320, [(5120, 5120), (5120, 13824), (13824, 5120)]),
    ("llama-3-8b", 8_030_261_248, [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]),
    ("llama-2-70b", 68_976_648_192, [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)]),
])
def test_the_architectures_have_the_published_size(gen: ModuleType, name: str, params: int,
                                                   shapes: list[tuple[int, int]]) -> None:
    model = gen.build_model(gen.llama_config(name), "meta")
    assert sum(p.numel() for p in model.parameters()) == params
    assert gen.linear_shapes(model) == shapes
    assert len(gen.quantizable(model)) == 7 * gen.llama_config(name).num_hidden_layers


def test_random_gptq_weights_are_symmetric_checkpoints_of_initializer_scale(gen: ModuleType) -> None:
    """What a GPTQ checkpoint loader accepts (sym=True checks the zeros), with weights of the
    spread transformers initialises to (std 0.02), so 40 random layers stay finite."""
    t = gen.random_gptq_on(1024, 256, "cpu", torch.Generator().manual_seed(0))
    q = QuantLinear.from_checkpoint_tensors(
        {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": t.g_idx},
        GPTQSpec(4, 128, sym=True))
    assert not q.problem.act_order
    assert 0.015 < float(reference.dequantize(t).std()) < 0.025


def test_the_quantized_model_can_be_built_without_its_fp16_one(gen: ModuleType) -> None:
    """Quantized-only runs build on `meta`: every quantizable linear is a QuantLinear, nothing
    is left on meta, embeddings/norms/head are initialised as transformers does, and the
    weights column counts the layers' own bytes against their packed size."""
    model = gen.build_quantized(tiny_llama_config(), "cpu")
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14 and not isinstance(model.lm_head, QuantLinear)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert 0.01 < float(model.model.embed_tokens.weight.detach().float().std()) < 0.03
    resident, packed = gen.weight_bytes(model)
    assert packed == sum(m.packed_bytes() for m in quant) and resident == sum(m.resident_bytes() for m in quant)
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 5))).logits
    assert torch.isfinite(logits.float()).all()
    fp16 = gen.build_model(tiny_llama_config(), "cpu")
    assert gen.weight_bytes(fp16) == (sum(m.weight.numel() * 2 for _, m in gen.quantizable(fp16)), None)


def _tiny(gen: ModuleType) -> Any:
    model = gen.build_model(tiny_llama_config(), "cpu", torch.float32)
    assert gen.quantize_random(model, config=None) == 14
    assert gen.quantizable(model) == [] and not isinstance(model.lm_head, QuantLinear)
    return model


def test_the_compiled_static_cache_decode_step_is_greedy_generation(gen: ModuleType) -> None:
    """The functions the GPU run compiles and captures, on CPU: a prefill fills the cache, each
    decode step appends one token (the argmax of the plain model's logits), a rewind restarts at
    the prompt's end, and the step traces whole (fullgraph)."""
    torch._dynamo.reset()
    model = _tiny(gen)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = gen.static_cache(model, 16)
    with torch.no_grad():
        logits = gen.prefill_fn(model, cache)(prompt)
        assert logits.shape == (2, 1, 256)
        assert int(cache.get_seq_length()) == 6
        step = torch.compile(gen.decode_step_fn(model, cache), fullgraph=True, backend="aot_eager")
        ids = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([prompt, ids], 1)
        for _ in range(3):
            step(ids)
            want = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(ids, want)
            seq = torch.cat([seq, ids], 1)
        assert int(cache.get_seq_length()) == 9
        gen.rewind(cache, 6)
        assert int(cache.get_seq_length()) == 6
    torch._dynamo.reset()


def _sample() -> dict[str, Any]:
    def row(name: str, tps: list[float], prefill: float, mem: float) -> dict[str, Any]:
        return {"row": name, "prefill_ms": prefill, "all_prefill_ms": [prefill],
                "decode": {str(b): {"tokens_per_s": t, "step_ms": b / t * 1e3, "all_tokens_per_s": [t]}
                           for b, t in zip((1, 4), tps, strict=True)},
                "peak_memory_gib": mem, "seconds": 1.0}

    fp16, default = row("fp16", [50.0, 190.0], 30.0, 27.5), row("default", [125.0, 380.0], 45.0, 9.0)
    fp16 |= {"weights_gib": 23.84, "packed_gib": None}
    default |= {"weights_gib": 6.34, "packed_gib": 6.2}
    tuned = row("tuned", [150.0, 500.0], 40.0, 9.0)  # as results written before the weights column
    tuned["tuned_found"] = False
    return {"format": "gemmtune-generate", "schema_version": 1, "created_at": "2027-01-02T03:04:05+00:00",
            "command": "python bench/generate.py --model llama-2-13b --batches 1,4",
            "device": {"name": "NVIDIA H200"}, "kernel_hash": "0" * 64, "torch": "2.11.0",
            "transformers": "5.17.0",
            "settings": {"prompt": 512, "batches": [1, 4], "steps": 32, "repeats": 5, "rows": []},
            "models": [{"model": "llama-2-13b", "layers": 40, "vocab_size": 32000, "shapes": [],
                        "rows": [fp16, default, tuned]}]}


def test_the_report_renders_the_benchmarks_table(gen: ModuleType, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps(_sample()))
    assert gen.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200, 2027-01-02" in out and "python bench/generate.py --model llama-2-13b --batches 1,4" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0] == ("| llama-2-13b (40 layers) | prefill (ms) | decode B=1 | decode B=4 | weights (GiB) "
                        "| peak memory (GiB) |")
    assert lines[2] == "| torch fp16 | 30.0 | 50.0 | 190.0 | 23.84 | 27.5 |"
    assert lines[3] == "| default | 45.0 | 125.0 (2.50×) | 380.0 (2.00×) | 6.34 (1.02×) | 9.0 |"
    assert lines[4].startswith("| tuned (nothing tuned: default) | 40.0 | 150.0 (3.00×)")
    assert lines[4].endswith("| - | 9.0 |")


def test_report_refuses_other_files(gen: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "gemmtune-bench"}))
    with pytest.raises(SystemExit, match="not a gemmtune-generate results file"):
        gen.main(["--report", str(path)])


@pytest.mark.parametrize("fuse, gemms", [(True, 8), (False, 14)])
def test_the_tuned_shapes_are_the_gemms_the_quantized_model_runs(gen: ModuleType, fuse: bool,
                                                                  gemms: int) -> None:
    """`tuned` tunes what the runtime launches: the fused groups by default (the tuner's own
    rule), every projection with --no-fuse."""
    from gemmtune.runtime import launched_problems

    model = gen.build_quantized(tiny_llama_config(), "cpu", fuse=fuse)
    running = launched_problems(model)
    assert sum(running.values()) == gemms
    assert set(gen.gemm_shapes(tiny_llama_config(), fuse)) == {(p.k, p.n) for p in running}
    assert gen.parse_args([]).fuse and not gen.parse_args(["--no-fuse"]).fuse


def test_kernels_are_classed_by_name(gen: ModuleType) -> None:
    assert gen.kernel_class("void gemmtune::gptq_gemm<4, 1, 4, 1, 4, false, false>(half const*)") == "gemmtune"
    assert gen.kernel_class("_ZN8gemmtune9gptq_gemmILi4ELi1EEEvPK6__half") == "gemmtune"  # not demangled
    assert gen.kernel_class("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT") == "gemm"
    assert gen.kernel_class("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert gen.kernel_class("void at::native::vectorized_elementwise_kernel<4>(...)") == "other"
    assert gen.kernel_class("flash_fwd_splitkv_kernel") == "other"
    assert gen.gemm_share({}, 10.0, "default") is None  # nothing profiled: nothing claimed
    t = {"us_per_step": {"gemmtune": 6000.0, "gemm": 500.0, "other": 2000.0}}
    assert gen.gemm_share(t, 10.0, "default") == pytest.approx(0.6)
    assert gen.gemm_share(t, 10.0, "fp16") == pytest.approx(0.05)
    assert gen.gemm_share(t, 10.0, "tuned", every_gemm=True) == pytest.approx(0.65)


def test_the_report_shows_the_measured_gemm_share(gen: ModuleType, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    res = _sample()
    res["settings"]["fuse"] = True
    for r, share in zip(res["models"][0]["rows"], (0.31, 0.62, None), strict=True):
        r["decode"]["1"]["gemm_share"] = share
    path = tmp_path / "g.json"
    path.write_text(json.dumps(res))
    assert gen.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "q+k+v and gate+up fused" in out and "GEMM share" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0].endswith("| decode B=4 | GEMM share B=1 | weights (GiB) | peak memory (GiB) |")
    assert lines[2] == "| torch fp16 | 30.0 | 50.0 | 190.0 | 31 % | 23.84 | 27.5 |"
    assert lines[3] == "| default | 45.0 | 125.0 (2.50×) | 380.0 (2.00×) | 62 % | 6.34 (1.02×) | 9.0 |"
    assert "| - | - | 9.0 |" in lines[4]
