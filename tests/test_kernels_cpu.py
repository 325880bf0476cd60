"""Kernel-layer logic that needs no GPU: configs, presets, problems, workloads, the tiled weight
layout, kernel_hash, and the static nvcc build of kernel variants."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from gemmtune.kernels import sources
from gemmtune.kernels.config import (
    DECODE_FIELDS,
    LATE_FIELDS,
    PRESETS,
    TILED,
    TILED_FIELDS,
    TILED_REGISTER_BOUND,
    TILES,
    TUNABLES,
    KernelConfig,
    preset,
    tiled_smem_bytes,
    tiled_violation,
)
from gemmtune.kernels.errors import InvalidConfigError, InvalidProblemError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.weights import tile_qweight, untile_qweight
from gemmtune.kernels.workload import WORKLOADS, Workload


def test_presets_are_the_exllamav2_constants() -> None:
    assert (PRESETS["exllamav2-0.0.11"].max_q_gemm_rows, PRESETS["exllamav2-0.0.11"].max_q_gemm_rows_kernel) == (50, 8)
    assert (PRESETS["exllamav2-0.0.12"].max_q_gemm_rows, PRESETS["exllamav2-0.0.12"].max_q_gemm_rows_kernel) == (32, 4)
    with pytest.raises(InvalidConfigError, match="unknown preset"):
        preset("exllamav2-9")


def test_config_key_is_stable_and_round_trips() -> None:
    cfg = KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8, block_n=128, threads=256,
                       split_k=4, k_unroll=2, recon_chunk_n=4096)
    assert cfg.key() == "r48-mk8-bn128-t256-sk4-u2-rc4096"
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(KernelConfig(**cfg.to_dict()))
    # Thresholds do not change the fused launch: the memo key ignores them.
    assert cfg.variant_key() == cfg.replace(max_q_gemm_rows=0, recon_chunk_n=0).variant_key()


@pytest.mark.parametrize("changes,field", [
    ({"max_q_gemm_rows_kernel": 10**9}, "max_q_gemm_rows_kernel"),
    ({"max_q_gemm_rows": -1}, "max_q_gemm_rows"),
    ({"block_n": 48}, "block_n"),
    ({"threads": 96}, "threads"),
    ({"block_n": 64, "threads": 192}, "power of two"),
    ({"max_q_gemm_rows_kernel": 64, "k_unroll": 4}, "k_unroll"),
    ({"recon_chunk_n": 1000}, "recon_chunk_n"),
    ({"split_k": True}, "split_k"),
])
def test_config_rejects_out_of_space(changes: dict, field: str) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        KernelConfig(**changes)


def test_from_dict_is_strict() -> None:
    d = KernelConfig().to_dict()
    with pytest.raises(InvalidConfigError, match="unknown"):
        KernelConfig.from_dict({**d, "warp_size": 32})
    d.pop("block_n")
    with pytest.raises(InvalidConfigError, match="missing"):
        KernelConfig.from_dict(d)


def test_every_variant_reads_back_from_its_variant_key() -> None:
    """bench JSON and memos name variants by key; every variant of the full space (both
    families) reads back as the same variant, and a key no config spells is refused."""
    from gemmtune.autotune.space import FULL

    for cfg in FULL.variants():
        back = KernelConfig.from_variant_key(cfg.variant_key())
        assert back.variant_key() == cfg.variant_key()
        assert back == cfg.replace(max_q_gemm_rows=back.max_q_gemm_rows,
                                   recon_chunk_n=back.recon_chunk_n)
    for bad in ("", "mk8-bn64", "tiled16x128x64-st4", "mk8-bn64-t64-sk0-u2-x", "tiled16x100x64-st4-sk0"):
        with pytest.raises(InvalidConfigError):
            KernelConfig.from_variant_key(bad)


def test_a_config_stored_before_the_tiled_kernel_is_a_decode_config() -> None:
    # Profiles and databases written before the tiled fields existed lack them: they must load
    # as the decode configs they were, with the key they were stored under.
    cfg = KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8, block_n=128, threads=256,
                       split_k=4, k_unroll=2, recon_chunk_n=4096)
    old = {k: v for k, v in cfg.to_dict().items() if k not in LATE_FIELDS}
    loaded = KernelConfig.from_dict(old)
    assert loaded == cfg and not loaded.tiled
    assert loaded.key() == cfg.key() and "tiled" not in loaded.key()
    old.pop("threads")  # a field that was always there is still required
    with pytest.raises(InvalidConfigError, match="missing config field.*threads"):
        KernelConfig.from_dict(old)


def test_tiled_config_keys_name_the_tile_and_round_trip() -> None:
    cfg = KernelConfig(max_q_gemm_rows=256, kernel=TILED, tile_m=32, tile_n=256, tile_k=128,
                       stages=3, split_k=2)
    assert cfg.tiled and cfg.tile_layout == TILES[(32, 256)]
    assert cfg.key() == "r256-mk32-bn64-t64-sk2-u2-rc0-tiled32x256x128-st3"
    assert cfg.variant_key() == "tiled32x256x128-st3-sk2"
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.variant_key() == cfg.replace(max_q_gemm_rows=0, recon_chunk_n=4096).variant_key()
    # Each tiled knob and the shared split_k are part of the launch identity.
    for change in ({"tile_m": 16}, {"tile_k": 64}, {"stages": 4}, {"split_k": 0}):
        assert cfg.replace(**change).variant_key() != cfg.variant_key()
    assert cfg.variant_key() != cfg.replace(kernel=0, tile_m=64, tile_n=128, tile_k=64,
                                            stages=4).variant_key()


@pytest.mark.parametrize("kernel,unused", [(TILED, DECODE_FIELDS), (0, TILED_FIELDS)])
def test_the_family_a_config_does_not_run_keeps_its_defaults(kernel: int, unused: tuple) -> None:
    # Otherwise two configs that launch the same kernel would differ in key (and be measured,
    # stored and served as two).
    base = KernelConfig(kernel=kernel)
    for f in unused:
        t = {t.name: t for t in TUNABLES}[f]
        other = next(c for c in t.choices if c != getattr(base, f))
        with pytest.raises(InvalidConfigError, match=f"{f} is not read by the"):
            base.replace(**{f: other})


def test_tiled_violation_says_why() -> None:
    assert tiled_violation(4, 64, 128, 64, 4) is None
    assert "not a built tile" in tiled_violation(4, 48, 128, 64, 4)
    assert "multiple of 64" in tiled_violation(4, 64, 128, 96, 3)
    need = tiled_smem_bytes(4, 64, 128, 64, 4)
    why = tiled_violation(4, 64, 128, 64, 4, smem_limit=need - 1)
    assert why is not None and "shared memory at 4-bit" in why
    assert tiled_violation(4, 64, 128, 64, 4, smem_limit=need) is None
    # The register bound depends on the bit width: 8-bit weights need twice the fragments.
    assert tiled_violation(4, 32, 256, 128, 4) is None
    assert "spills registers at 8-bit" in tiled_violation(8, 32, 256, 128, 4)
    assert "any number of stages" in tiled_violation(4, 128, 256, 128, 2)
    for bits, bounds in TILED_REGISTER_BOUND.items():
        for (tm, tn, tk), most in bounds.items():
            assert (tm, tn) in TILES
            if most:
                assert tiled_violation(bits, tm, tn, tk, most) is None
            assert "spills registers" in tiled_violation(bits, tm, tn, tk, most + 1)


def test_config_applies_the_tiled_rule() -> None:
    with pytest.raises(InvalidConfigError, match="spills registers"):
        KernelConfig(kernel=TILED, tile_m=128, tile_n=256, tile_k=128, stages=2)
    with pytest.raises(InvalidConfigError, match="not a built tile"):
        KernelConfig(kernel=TILED, tile_m=16, tile_n=64 * 3)


def test_every_tunable_choice_is_inside_its_range() -> None:
    for t in TUNABLES:
        assert all(t.lo <= c <= t.hi for c in t.choices), t.name


def test_problem_key_round_trip_and_rules() -> None:
    p = Problem(14336, 4096, 4, 128, True)
    assert Problem.from_key(p.key()) == p
    assert Problem(4096, 11008, 8, -1).groups == 1
    with pytest.raises(InvalidProblemError, match="multiple of group_size"):
        Problem(4096 + 32, 4096, 4, 128)
    with pytest.raises(InvalidProblemError, match="bits"):
        Problem(4096, 4096, 5)
    with pytest.raises(InvalidProblemError, match="problem key"):
        Problem.from_key("4096-4096")


def test_workloads_parse_and_weigh() -> None:
    assert Workload.parse("decode") is WORKLOADS["decode"]
    w = Workload.parse("1:4,512:1")
    assert w.ms == (1, 512) and w.objective({1: 10.0, 512: 100.0}) == 140.0
    assert Workload.parse(w.key()) == w
    for bad in ("1,1", "0", "1:-2", "x"):
        with pytest.raises(InvalidProblemError):
            Workload.parse(bad)


@pytest.mark.parametrize("rows,n", [(16, 64), (8, 608), (32, 40), (4, 4096)])
def test_tiled_layout_round_trips_and_puts_a_warp_step_together(rows: int, n: int) -> None:
    q = torch.randint(-(2**31), 2**31 - 1, (rows, n), dtype=torch.int32)
    tiled = tile_qweight(q)
    assert torch.equal(untile_qweight(tiled, rows, n), q)
    steps = rows // 4
    # Lane 4g+t of the warp for column block cb at step s holds row 4s+t, columns cb*32+4g..+3.
    gen = torch.Generator().manual_seed(rows + n)
    for _ in range(20):
        cb = int(torch.randint(0, n // 32 or 1, (1,), generator=gen)) if n >= 32 else 0
        s = int(torch.randint(0, steps, (1,), generator=gen))
        lane = int(torch.randint(0, 32, (1,), generator=gen))
        g, t = lane // 4, lane % 4
        base = ((cb * steps + s) * 32 + lane) * 4
        for c in range(4):
            col = cb * 32 + 4 * g + c
            expect = int(q[4 * s + t, col]) if col < n else 0
            assert int(tiled[base + c]) == expect


def test_kernel_hash_follows_sources(tmp_path, monkeypatch) -> None:
    h = sources.kernel_hash("nvrtc-13.0")
    assert h == sources.kernel_hash("nvrtc-13.0")
    assert h != sources.kernel_hash("nvrtc-12.8")
    for p in sources.source_files():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(sources, "CUDA_DIR", tmp_path)
    assert sources.kernel_hash("nvrtc-13.0") == h
    f = tmp_path / "gptq_gemm.cu"
    f.write_text(f.read_text() + "\n// changed\n")
    assert sources.kernel_hash("nvrtc-13.0") != h


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_static_build_reports_resources_and_no_spills() -> None:
    import tempfile
    from pathlib import Path

    from gemmtune.kernels.buildcheck import (
        build_batch,
        fused_variants,
        recon_variants,
        tiled_variants,
    )

    # Two tiled instances of one tile that differ only in the split flag and the bits: each must
    # be matched to its own ptxas report (the mangled-name lookup).
    tiled = [v for v in tiled_variants((4, 8)) if (v.tile_m, v.tile_n, v.tile_k) == (16, 128, 64)
             and v.stages == 3]
    assert len(tiled) == 4
    variants = [*fused_variants((4,), quick=True)[:6], *tiled, *recon_variants((4,))]
    with tempfile.TemporaryDirectory() as tmp:
        results = build_batch(variants, "sm_90", Path(tmp))
    assert len(results) == len(variants)
    for v, r in zip(variants, results, strict=True):
        assert r.variant is v
        assert r.ok, r.message
        assert r.registers > 0 and r.spill_bytes == 0
    for r in results[6:10]:
        assert r.shared_bytes >= r.variant.smem_bytes > 0  # the stages' dynamic shared memory


def test_build_check_lists_every_tiled_instance_the_rule_allows() -> None:
    from gemmtune.kernels.buildcheck import tiled_variants

    by = {t.name: t.choices for t in TUNABLES}
    built = tiled_variants((4, 8))
    assert len({v.expression() for v in built}) == len(built)
    got = {(v.bits, v.tile_m, v.tile_n, v.tile_k, v.stages, v.split) for v in built}
    want = {(b, tm, tn, tk, st, split)
            for b, (tm, tn), tk, st, split in itertools.product(
                (4, 8), TILES, by["tile_k"], by["stages"], (False, True))
            if tiled_violation(b, tm, tn, tk, st) is None}
    assert got == want
    # Each instance is the layout the tile names (what dispatch.Plan launches).
    assert all(TILES[(v.tile_m, v.tile_n)] == (v.warps_m, v.mt, v.warps_n, v.nw) for v in built)
    # The rule leaves out what spills, bits by bits (8-bit 128x256 with 4 stages, for one).
    assert (8, 128, 256, 64, 4) not in {k[:5] for k in got}
    assert (4, 128, 256, 64, 2) in {k[:5] for k in got}
    quick = tiled_variants((4, 8), quick=True)
    assert len(quick) == 12 and set(quick) < set(built)  # every sample still allowed, both splits
    assert {v.bits for v in quick} == {4, 8}


def test_a_growing_workspace_keeps_the_buffers_graphs_captured() -> None:
    """A CUDA graph captured before a larger layer was bound still points at the old split-K
    buffers: growing must leave them allocated (and untouched), not hand them back to the
    allocator. Device-independent logic, checked on CPU tensors."""
    from gemmtune.kernels.workspace import Workspace

    ws = Workspace(torch.device("cpu"))
    ws.ensure(64, 8, 128)
    old = (ws.partials, ws.counters, ws.dequant)
    ptrs = [t.data_ptr() for t in old]
    ws.ensure(32, 4, 64)  # smaller: nothing changes
    assert (ws.partials, ws.counters, ws.dequant) == old and not ws.retired
    ws.ensure(1024, 16, 4096)
    assert ws.partials.numel() == 1024 and ws.counters.numel() == 16 and ws.dequant.numel() == 4096
    assert not ws.partials.any() and not ws.counters.any()  # split-K scratch starts zero
    assert [t.data_ptr() for t in ws.retired] == ptrs  # the old buffers, still alive
    assert all(t.data_ptr() not in ptrs for t in (ws.partials, ws.counters, ws.dequant))


@pytest.mark.parametrize("args,says", [
    (["--bits", "x"], "expected comma-separated bit widths"),
    (["--arch", ""], "no target to build"),
    (["--bits", ""], "no bit width to build"),
    (["--bits", "3"], "no CUDA kernel for 3-bit"),
    (["--arch", "90"], "is not of the form sm_90"),
])
def test_kernels_check_refuses_bad_or_empty_lists_in_one_line(args: list[str], says: str) -> None:
    # A check that builds nothing must not pass as "all 0 builds clean": a CI gate with an empty
    # list would stay green. One line, exit 1, before any build.
    from click.testing import CliRunner

    from gemmtune.cli import main

    res = CliRunner().invoke(main, ["kernels", "check", *args])
    assert res.exit_code == 1
    assert says in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
