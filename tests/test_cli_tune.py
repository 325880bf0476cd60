"""`gemmtune tune` end to end on CPU: the GPU seams of `autotune.study` are replaced by the
synthetic landscape, everything else (problems, database, studies, table, exit codes) is real."""

from __future__ import annotations

import os
import queue
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner
from gemmtune.autotune import study as st
from gemmtune.autotune import workers as wk
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import WORKLOADS, Workload

from gemmtune.cli import main
from gemmtune.cli._common import _config_short
from tests.synthetic import FAKE_DEVICE, FAKE_KERNEL_HASH, SyntheticEvaluator


class FakeGPU:
    """Replaces the GPU seams; counts evaluators so tests can tell a skipped shape."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 1, **evaluator_kw: Any) -> None:
        self.evaluators: list[SyntheticEvaluator] = []
        self.evaluator_kw = evaluator_kw
        monkeypatch.setattr(st, "gpu_count", lambda: count)
        monkeypatch.setattr(st, "device_identity", lambda i=0: (FAKE_DEVICE, FAKE_KERNEL_HASH))
        monkeypatch.setattr(st, "make_evaluator", self.make)

    def make(self, problem: Problem, workload: Workload, device_index: int = 0) -> SyntheticEvaluator:
        ev = SyntheticEvaluator(problem, workload, **self.evaluator_kw)
        self.evaluators.append(ev)
        return ev


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tuning.db'}"


def run(*args: str) -> Any:
    return CliRunner().invoke(main, ["tune", *args], catch_exceptions=False)


def stored(db: str) -> list[Any]:
    from gemmtune.db.store import Store

    store = Store.open(db)
    try:
        return store.list_results()
    finally:
        store.close()


def test_no_gpu_is_one_line_and_touches_no_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(st, "gpu_count", lambda: 0)
    path = tmp_path / "tuning.db"
    result = run("--shape", "4096x4096", "--db", f"sqlite:///{path}")
    assert result.exit_code != 0
    assert "no CUDA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not path.exists()


def test_layers_without_a_cuda_kernel_are_refused_before_anything_else(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A 3-bit checkpoint runs on the CPU reference path: tuning or measuring it would only fail
    # later, or time a kernel it never runs. One line, before the GPU check.
    import json

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                               "num_hidden_layers": 2, "num_attention_heads": 32,
                               "num_key_value_heads": 8,
                               "quantization_config": {"quant_method": "gptq", "bits": 3,
                                                       "group_size": 128}}))
    monkeypatch.setattr(st, "gpu_count", lambda: 1)
    for args, what in ((["tune", "--config", str(cfg)], "nothing to tune"),
                       (["bench", "default", "--config", str(cfg)], "nothing to measure")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        assert "3-bit layers have no CUDA kernel" in r.stderr and what in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    # resolve shows what such a layer gets: the dense reference at every M, not a band's config
    # the runtime would never apply.
    r = CliRunner().invoke(main, ["resolve", "--config", str(cfg), "--fingerprint", "0" * 16])
    assert r.exit_code == 0, r.output
    assert "dense reference" in r.output and "no CUDA kernel for 3-bit" in r.output
    assert "default" not in r.output
    r = CliRunner().invoke(main, ["resolve", "--config", str(cfg), "--fingerprint", "0" * 16, "--json"])
    layers = json.loads(r.output)["layers"]
    assert layers and all(lay["path"] == "dense reference" and lay["bands"] == [] for lay in layers)


# Llama-3-8B's distinct shapes: as gemmtune's runtime runs it (q+k+v and gate+up fused, o,
# down), every projection alone (q/o, k/v, gate/up, down), and an engine's fused layout.
LLAMA_3_8B = {
    (): {"4096x6144-b4-g128", "4096x4096-b4-g128", "4096x28672-b4-g128", "14336x4096-b4-g128"},
    ("--layout", "separate"): {"4096x4096-b4-g128", "4096x1024-b4-g128", "4096x14336-b4-g128",
                               "14336x4096-b4-g128"},
    ("--layout", "fused"): {"4096x6144-b4-g128", "4096x4096-b4-g128", "4096x28672-b4-g128",
                            "14336x4096-b4-g128"},
}
LLAMA_3_8B_NAMES = {(): "q_proj+k_proj+v_proj×32", ("--layout", "separate"): "q_proj×32, o_proj×32",
                    ("--layout", "fused"): "qkv×32"}


@pytest.mark.parametrize("layout", list(LLAMA_3_8B), ids=["default-transformers", "separate", "fused"])
def test_tunes_every_shape_of_a_model_and_stores_it(monkeypatch: pytest.MonkeyPatch, db_url: str,
                                                    layout: tuple[str, ...]) -> None:
    db = db_url  # SQLite file and (when the suite has a server) PostgreSQL
    gpu = FakeGPU(monkeypatch)
    result = CliRunner().invoke(main, ["tune", "--model", "llama-3-8b", *layout, "--workload",
                                       "decode", "--trials", "6", "--db", db],
                                env={"COLUMNS": "200"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {ev.problem.key() for ev in gpu.evaluators} == LLAMA_3_8B[layout]  # each shape once
    assert all(key in result.output for key in LLAMA_3_8B[layout])
    assert LLAMA_3_8B_NAMES[layout] in result.output
    assert "tuned" in result.output and "speedup" in result.output
    assert len(gpu.evaluators) == 4
    assert all(ev.closed for ev in gpu.evaluators)
    entries = stored(db)
    assert {e.problem_key for e in entries} == {ev.problem.key() for ev in gpu.evaluators}
    assert all(e.workload_key == "decode" and e.speedup >= 1.0 for e in entries)
    names = optuna.get_all_study_names(db)  # the studies live in the same database
    assert len(names) == 4 and all(n.startswith(f"gemmtune:{FAKE_DEVICE.fingerprint}:") for n in names)


def test_already_tuned_shapes_are_skipped_unless_retune(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    gpu = FakeGPU(monkeypatch)
    args = ("--shape", "4096x4096", "--workload", "1,2,4", "--trials", "5", "--db", db)
    assert run(*args).exit_code == 0
    assert len(gpu.evaluators) == 1

    again = run(*args)
    assert again.exit_code == 0 and "stored" in again.output and "--retune" in again.output
    assert len(gpu.evaluators) == 1  # nothing measured

    retune = run(*args, "--retune")
    assert retune.exit_code == 0 and "tuned" in retune.output
    assert len(gpu.evaluators) == 2 and gpu.evaluators[1].calls["fused"] > 0  # a fresh search
    study = optuna.load_study(study_name=optuna.get_all_study_names(db)[0], storage=db)
    assert len(study.trials) == 5


def test_a_tuned_plan_over_m_bands_is_shown_band_by_band_and_stored(
        monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    from tests.test_study import GEMV, _TwoRegimes

    FakeGPU(monkeypatch, landscape=_TwoRegimes())
    args = ["tune", "--shape", "4096x4096", "--trials", "8", "--db", db]
    narrow = {"COLUMNS": "80"}  # a terminal's default width: each band on one line, unwrapped
    outputs = [CliRunner().invoke(main, args, env=narrow) for _ in range(2)]
    (entry,) = stored(db)
    (m_hi, first), (top, last) = entry.bands
    assert (m_hi, top) == (4, None) and last == entry.config
    assert KernelConfig.from_dict(first).variant_key() == GEMV.variant_key()
    for attempt in outputs:  # tuned, then the stored entry
        assert attempt.exit_code == 0, attempt.output
        lines = attempt.output.splitlines()
        for span, cfg in (("M 1-4", first), ("M >= 5", last)):
            short = _config_short(KernelConfig.from_dict(cfg))
            assert any(span in ln and short in ln for ln in lines), (span, short, attempt.output)


def test_slower_winner_keeps_the_default(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    FakeGPU(monkeypatch, interleave_penalty=3.0)
    result = run("--shape", "4096x4096", "--trials", "5", "--db", db)
    assert result.exit_code == 0, result.output
    assert "default kept" in result.output and "slower than the default" in result.output
    assert stored(db) == []


def test_ctrl_c_stops_after_the_trial_and_resumes(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    measured: set[str] = set()

    def ctrl_c_on_fourth_variant(cfg: KernelConfig, m: int) -> None:
        measured.add(cfg.variant_key())
        if len(measured) == 4 and m == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal would; handled, not raised

    gpu = FakeGPU(monkeypatch, on_fused=ctrl_c_on_fourth_variant)
    args = ("--shape", "4096x4096", "--shape", "8192x8192", "--workload", "decode",
            "--sampler", "random", "--seed", "1", "--trials", "10", "--db", db)
    result = run(*args)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "resume" in result.output
    assert len(gpu.evaluators) == 1  # the second shape was never started
    study = optuna.load_study(study_name=optuna.get_all_study_names(db)[0], storage=db)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    assert stored(db) == []

    gpu.evaluator_kw = {}
    resumed = run(*args)
    assert resumed.exit_code == 0, resumed.output
    assert len(stored(db)) == 2
    study = optuna.load_study(study_name=study.study_name, storage=db)
    assert len(study.trials) == 10  # the target is a total: 4 kept + 6 new


@pytest.mark.parametrize("args, message", [
    (("--shape", "4096"), "not a shape"),
    (("--shape", "4096x4096", "--workload", "often"), "workload"),
    (("--shape", "4096x4096", "--device", "3"), "GPU 3 does not exist"),
    (("--shape", "4096x4096", "--device", "first"), "GPU index or `all`"),
    (("--model", "no-such-model"), "no-such-model"),
    (("--model", "llama-3-8b", "--layout", "vllm"), "unknown layout 'vllm': choose transformers, separate, fused"),
    (("--shape", "4096x4096", "--layout", "fuse"), "unknown layout 'fuse'"),
    ((), "nothing to tune"),
])
def test_bad_input_is_one_line(monkeypatch: pytest.MonkeyPatch, db: str, args: tuple[str, ...],
                               message: str) -> None:
    gpu = FakeGPU(monkeypatch)
    result = run(*args, "--db", db)
    assert result.exit_code == 1  # tune's status for every input error
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert gpu.evaluators == []  # refused before anything was measured


def test_help_teaches() -> None:
    out = CliRunner().invoke(main, ["tune", "--help"]).output
    for needle in ("gemmtune tune --model llama-3-8b", "--sampler grid", "--device all",
                   "postgresql", "decode", "prefill", "mixed", "resume", "--layout",
                   "transformers", "fused", "gate_up", "[default: transformers]"):
        assert needle in out


def test_worker_loop_tunes_each_queued_problem_once(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    gpu = FakeGPU(monkeypatch)
    problems = (Problem(4096, 4096), Problem(4096, 14336), Problem(14336, 4096))
    job = wk.WorkerJob(db, problems, WORKLOADS["decode"], st.TuneSettings(trials=4, seed=0))
    jobs: queue.Queue[int] = queue.Queue()
    for i in range(len(problems)):
        jobs.put(i)
    events: list[wk.WorkerEvent] = []
    wk.worker_loop(job, 5, jobs, events.append, lambda: False)
    results = [e for e in events if e.kind == "result"]
    assert sorted(e.index for e in results) == [0, 1, 2]
    assert all(e.payload.status == "accepted" and e.payload.device_index == 5 for e in results)
    assert any(e.kind == "trial" for e in events)
    assert len(gpu.evaluators) == 3 and len(stored(db)) == 3


def test_worker_pins_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert wk.physical_gpu(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert wk.physical_gpu(1) == "3"


def _checkpoint_dir(tmp_path: Path, qc: dict[str, Any]) -> Path:
    import json

    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
        "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 2,
        "quantization_config": qc}))
    return d


@pytest.mark.parametrize("flag", ["--config", "--model"])
def test_an_awq_checkpoint_is_tuned_with_its_own_group_size(monkeypatch: pytest.MonkeyPatch, db: str,
                                                            tmp_path: Path, flag: str) -> None:
    gpu = FakeGPU(monkeypatch)
    d = _checkpoint_dir(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 64,
                                   "zero_point": True, "version": "gemm"})
    target = str(d / "config.json") if flag == "--config" else str(d)
    result = run(flag, target, "--workload", "decode", "--trials", "3", "--db", db)
    assert result.exit_code == 0, result.output
    # the GEMMs the runtime runs for this Llama: q+k+v 1024x(1024+2*256) (4 kv heads of 64),
    # o 1024x1024, gate+up 1024x(2*2816), down
    assert {ev.problem.key() for ev in gpu.evaluators} == {
        "1024x1536-b4-g64", "1024x1024-b4-g64", "1024x5632-b4-g64", "2816x1024-b4-g64"}


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "exl2", "bits": 4.65}, "quant_method='exl2'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128,
      "dynamic": {r".*down_proj": {"bits": 8}}}, "bits=8: mixed bit widths"),
])
def test_an_unsupported_checkpoint_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, db: str,
                                                          tmp_path: Path, qc: dict[str, Any],
                                                          field: str) -> None:
    gpu = FakeGPU(monkeypatch)
    d = _checkpoint_dir(tmp_path, qc)
    result = run("--config", str(d / "config.json"), "--db", db)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert field in result.stderr and "quantization_config" in result.stderr
    assert "Traceback" not in result.output and gpu.evaluators == []


def test_the_config_column_names_the_kernel_family_it_runs() -> None:
    """A tiled band is spelled by its block tile and stages, not by decode factors it ignores
    (the tune, bench and resolve tables all use this spelling)."""
    from gemmtune.kernels.config import TILED

    tiled = KernelConfig(max_q_gemm_rows=128, kernel=TILED, tile_m=32, tile_n=128, tile_k=64,
                         stages=3, split_k=8)
    decode = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=4, split_k=2)
    assert _config_short(tiled) == "≤128 fused, tiled 32x128x64 st3 sk8"
    assert _config_short(decode) == "≤8 fused, 4 rows, 64x64 u2 sk2"
    # split-K and the reconstruct chunk are named when they are not the defaults (0), only
    assert _config_short(decode.replace(split_k=0)) == "≤8 fused, 4 rows, 64x64 u2"
    assert _config_short(tiled.replace(recon_chunk_n=4096)) == \
        "≤128 fused, tiled 32x128x64 st3 sk8 rc4096"


def test_every_kernel_family_has_its_own_spelling() -> None:
    """A wgmma or stream band must not read as a decode config (the factors it would show are
    not the ones it runs): each family's start config names its family."""
    from gemmtune.autotune.space import STREAM_START, TILED_START, WGMMA_START

    spelled = {name: _config_short(cfg) for name, cfg in
               (("tiled", TILED_START), ("wgmma", WGMMA_START), ("stream", STREAM_START))}
    for family, text in spelled.items():
        assert f" {family} " in text, text
    assert _config_short(WGMMA_START.replace(wgmma_stages=WGMMA_START.wgmma_stages + 1)) \
        != spelled["wgmma"]
    assert len({*spelled.values(), _config_short(KernelConfig())}) == 4
