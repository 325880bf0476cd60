"""The wgmma kernel family without a GPU: its index mapping (simulated on the CPU against a plain
matrix product), its config keys and rules, its place in the search space per card, and the
static build list."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
from gemmtune.autotune.space import FULL, STANDARD, WGMMA_START, families_on, warm_start_configs
from gemmtune.kernels.config import (
    LATE_FIELDS,
    TILED,
    TUNABLES,
    WGMMA,
    WGMMA_FIELDS,
    WGMMA_REGISTER_BOUND,
    WGMMA_TILES,
    KernelConfig,
    wgmma_smem_bytes,
    wgmma_violation,
)
from gemmtune.kernels.errors import InvalidConfigError
from gemmtune.kernels.gptq import pack_rows
from gemmtune.kernels.problem import KERNEL_BITS
from gemmtune.kernels.weights import tile_qweight


def _simulate(bits: int, k: int, wgn: int, tn: int, seed: int) -> None:
    """Run the kernel's data movement for one block on the CPU: the weight words each thread
    reads (tiled layout), the pairs its dequantisation yields and where gptq_wgmma_gemm.cu puts
    them in its wgmma A fragments; the activations' permuted staging (its byte_perm stores); and
    the PTX ISA's register-A / K-major interleaved descriptor / accumulator layouts of
    wgmma.m64nNk16. The product must be the plain C^T = W^T A^T (integers, exact in float64)."""
    rng = np.random.default_rng(seed)
    n = 128 * wgn
    q = rng.integers(0, 1 << bits, size=(k, n))
    act = rng.integers(-8, 9, size=(tn, k)).astype(np.float64)
    tiled = tile_qweight(pack_rows(torch.from_numpy(q).to(torch.int32), bits)).numpy().view(np.uint32)
    kstep = 4 * (32 // bits)
    ch = kstep // 8
    steps = k // kstep
    tile_m = tn

    # Activation staging: chunk x of a step and row -> words of permuted chunk c (store_a).
    smem = np.zeros((steps * ch, tile_m, 8))  # [chunk column][row][position]
    for row, s, x in itertools.product(range(tn), range(steps), range(ch)):
        e = act[row, s * kstep + 8 * x: s * kstep + 8 * x + 8]
        regs = [(e[2 * i], e[2 * i + 1]) for i in range(4)]
        for c in range(ch):
            half = c % 2  # selector 0x5410 (low halves) or 0x7632 (high halves)
            if ch == 4:
                words = [(regs[c // 2][half], regs[2 + c // 2][half])]
                word0 = x  # 4 bytes at offset 4x
            else:
                words = [(regs[2 * i][half], regs[2 * i + 1][half]) for i in range(2)]
                word0 = 2 * x  # 8 bytes at offset 8x
            for i, (lo, hi) in enumerate(words):
                smem[s * ch + c, row, 2 * (word0 + i)] = lo
                smem[s * ch + c, row, 2 * (word0 + i) + 1] = hi

    d = np.zeros((wgn, 2, 64, tn))  # accumulators per warpgroup and m64 tile: D[row][token]
    filled = np.zeros((wgn, 2, 64, 16), dtype=int)
    for s in range(steps):
        for j in range(kstep // 16):
            a = np.zeros((wgn, 2, 64, 16))
            filled[:] = 0
            for wn, w, g, t in itertools.product(range(wgn), range(4), range(8), range(4)):
                lane = 4 * g + t
                cb = wn * 4 + w
                words = tiled[(cb * steps + s) * 128 + lane * 4: (cb * steps + s) * 128 + lane * 4 + 4]
                for mt, h, rh in itertools.product(range(2), range(2), range(2)):
                    cc = 2 * mt + rh
                    p = 2 * j + h if bits == 4 else h
                    word = int(words[cc])
                    if bits == 4:  # nibbles (p, p + 4) of the word
                        pair = ((word >> (4 * p)) & 15, (word >> (4 * (p + 4))) & 15)
                    else:  # bytes (p, p + 2)
                        pair = ((word >> (8 * p)) & 255, (word >> (8 * (p + 2))) & 255)
                    # Register a[2h + rh] of a warp: rows g + 8 rh, k slots 2t + 8h (+1).
                    for e in range(2):
                        a[wn, mt, 16 * w + g + 8 * rh, 2 * t + 8 * h + e] = pair[e]
                        filled[wn, mt, 16 * w + g + 8 * rh, 2 * t + 8 * h + e] += 1
            assert (filled == 1).all()
            # B from shared memory: k slot kk of the instruction is position kk % 8 of chunk
            # column q0 + kk // 8 (the leading byte offset steps one chunk column).
            q0 = s * ch + (2 * j if bits == 4 else 0)
            b = np.stack([smem[q0 + kk // 8, :, kk % 8] for kk in range(16)])  # [16][token]
            d += a @ b
    # Accumulator row 16w + g + 8rh of tile mt is column 32 (4 wn + w) + 4g + 2mt + rh.
    ref = q.T.astype(np.float64) @ act.T  # [n][token]
    for wn, mt, w, g, rh in itertools.product(range(wgn), range(2), range(4), range(8), range(2)):
        col = 32 * (4 * wn + w) + 4 * g + 2 * mt + rh
        np.testing.assert_array_equal(d[wn, mt, 16 * w + g + 8 * rh], ref[col])


@pytest.mark.parametrize("bits,k,wgn,tn", [(4, 64, 1, 16), (4, 128, 2, 32), (8, 64, 1, 16),
                                          (8, 96, 2, 8)])
def test_the_kernels_fragment_and_staging_mapping_computes_the_product(bits: int, k: int, wgn: int,
                                                                         tn: int) -> None:
    _simulate(bits, k, wgn, tn, seed=bits * 1000 + k + tn)


def test_wgmma_config_keys_name_the_tile_and_round_trip() -> None:
    cfg = KernelConfig(max_q_gemm_rows=512, kernel=WGMMA, wgmma_m=128, wgmma_n=256, wgmma_k=64,
                       wgmma_stages=3, split_k=2)
    assert cfg.wgmma and not cfg.tiled and cfg.wgmma_layout == WGMMA_TILES[(128, 256)]
    assert cfg.key() == "r512-mk32-bn64-t64-sk2-u2-rc0-wgmma128x256x64-st3"
    assert cfg.variant_key() == "wgmma128x256x64-st3-sk2"
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert KernelConfig.from_variant_key(cfg.variant_key()) == cfg.replace(max_q_gemm_rows=64)
    for change in ({"wgmma_m": 64}, {"wgmma_m": 64, "wgmma_k": 128}, {"wgmma_stages": 4},
                   {"split_k": 0}):
        assert cfg.replace(**change).variant_key() != cfg.variant_key()
    # The other families' fields stay at their defaults, and wgmma's for them.
    with pytest.raises(InvalidConfigError, match="tile_m is not read by the wgmma kernel"):
        cfg.replace(tile_m=16)
    with pytest.raises(InvalidConfigError, match="wgmma_m is not read by the tiled kernel"):
        KernelConfig(kernel=TILED, wgmma_m=128)
    with pytest.raises(InvalidConfigError, match="wgmma_m is not read by the decode kernel"):
        KernelConfig(wgmma_m=128)


def test_configs_stored_before_the_wgmma_kernel_still_load() -> None:
    # Decode configs (no kernel field) and tiled configs (no wgmma fields) keep their keys.
    tiled = KernelConfig(kernel=TILED, tile_m=32, stages=3)
    for cfg, missing in ((KernelConfig(max_q_gemm_rows=48), LATE_FIELDS), (tiled, WGMMA_FIELDS)):
        old = {k: v for k, v in cfg.to_dict().items() if k not in missing}
        loaded = KernelConfig.from_dict(old)
        assert loaded == cfg and loaded.key() == cfg.key() and "wgmma" not in loaded.key()


def test_wgmma_violation_says_why() -> None:
    assert wgmma_violation(4, 64, 256, 64, 4) is None
    assert "not a built tile" in wgmma_violation(4, 48, 256, 64, 4)
    assert "multiple of 64" in wgmma_violation(4, 64, 256, 96, 4)
    need = wgmma_smem_bytes(8, 64, 256, 128, 5)
    assert need > 227 * 1024 and "shared memory" in wgmma_violation(8, 64, 256, 128, 5)
    assert wgmma_violation(4, 64, 256, 64, 4, smem_limit=wgmma_smem_bytes(4, 64, 256, 64, 4)) is None
    assert "shared memory" in wgmma_violation(
        4, 64, 256, 64, 4, smem_limit=wgmma_smem_bytes(4, 64, 256, 64, 4) - 1)
    for bits, bounds in WGMMA_REGISTER_BOUND.items():
        for (tm, tn, tk), most in bounds.items():
            assert "spills registers" in wgmma_violation(bits, tm, tn, tk, most + 1)
    with pytest.raises(InvalidConfigError, match="not a built tile"):
        KernelConfig(kernel=WGMMA, wgmma_m=128, wgmma_n=128)


def test_the_family_is_offered_on_sm90_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """On by default on sm_90 cards; GEMMTUNE_WGMMA=0 (space.WGMMA_SWITCH) takes it out."""
    monkeypatch.delenv("GEMMTUNE_WGMMA", raising=False)
    assert WGMMA in families_on("9.0")
    assert any(c.wgmma for c in STANDARD.for_device("9.0").variants())
    monkeypatch.setenv("GEMMTUNE_WGMMA", "0")
    assert WGMMA not in families_on("9.0")
    assert not any(c.wgmma for c in STANDARD.for_device("9.0").variants())
    assert WGMMA in families_on("9.0", wgmma=True)


def test_the_family_exists_on_sm90_cards_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMTUNE_WGMMA", raising=False)
    assert WGMMA in families_on("9.0") and {0, 1} <= set(families_on("9.0"))
    for cc in ("8.0", "8.6", "8.9", "10.0", "12.0"):
        assert WGMMA not in families_on(cc)
        for space in (STANDARD, FULL):
            local = space.for_device(cc)
            assert local.name == space.name
            assert not any(c.wgmma for c in local.variants())
            # Only the wgmma family is dropped.
            assert {f.kernel for f in local.families} == {f.kernel for f in space.families} - {WGMMA}
            assert "wgmma-default" not in [n for n, _ in warm_start_configs(local)]
    assert STANDARD.for_device("9.0") is STANDARD
    assert "wgmma-default" in [n for n, _ in warm_start_configs(STANDARD)]
    assert STANDARD.contains(WGMMA_START)
    with pytest.raises(InvalidConfigError, match="compute capability"):
        families_on("sm90")


def test_space_points_pass_the_rule_at_every_bit_width() -> None:
    for space in (STANDARD, FULL):
        points = [c for c in space.variants() if c.wgmma]
        assert points and len({c.variant_key() for c in points}) == len(points)
        for c in points:
            assert all(wgmma_violation(b, c.wgmma_m, c.wgmma_n, c.wgmma_k, c.wgmma_stages) is None
                       for b in KERNEL_BITS)
    # STANDARD: every built tile at stages of 64, the deepest pipeline up to 4 that fits.
    assert {(c.wgmma_m, c.wgmma_n) for c in STANDARD.variants() if c.wgmma} == set(WGMMA_TILES)


def test_build_check_lists_every_wgmma_instance_the_rule_allows() -> None:
    from gemmtune.kernels.buildcheck import wgmma_variants

    by = {t.name: t.choices for t in TUNABLES}
    built = wgmma_variants((4, 8))
    assert len({v.expression() for v in built}) == len(built)
    got = {(v.bits, v.tile_m, v.tile_n, v.tile_k, v.stages, v.split) for v in built}
    want = {(b, tm, tn, tk, st, split)
            for b, (tm, tn), tk, st, split in itertools.product(
                (4, 8), WGMMA_TILES, by["wgmma_k"], by["wgmma_stages"], (False, True))
            if wgmma_violation(b, tm, tn, tk, st) is None}
    assert got == want
    assert all(WGMMA_TILES[(v.tile_m, v.tile_n)] == (v.wgm, v.tn, v.wgn) for v in built)
    assert all(v.arch == "sm_90a" and v.smem_bytes == wgmma_smem_bytes(
        v.bits, v.tile_m, v.tile_n, v.tile_k, v.stages) for v in built)
    quick = wgmma_variants((4, 8), quick=True)
    assert set(quick) < set(built) and {v.bits for v in quick} == {4, 8}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_static_build_of_wgmma_instances_for_sm90a() -> None:
    import tempfile
    from pathlib import Path

    from gemmtune.kernels.buildcheck import build_batch, wgmma_variants

    # The smallest and the widest tile at both bit widths and both split flags: each matched to
    # its own ptxas report, no spills, no serialised wgmma.
    variants = [v for v in wgmma_variants((4, 8)) if v.stages == 3 and v.tile_k == 64
                and (v.tile_m, v.tile_n) in ((16, 128), (128, 256))]
    assert len(variants) == 8
    with tempfile.TemporaryDirectory() as tmp:
        results = build_batch(variants, "sm_90a", Path(tmp))
    for v, r in zip(variants, results, strict=True):
        assert r.variant is v
        assert r.ok, r.message
        assert 0 < r.registers <= 255 and r.spill_bytes == 0
        assert r.shared_bytes >= v.smem_bytes


def _nvrtc_loads() -> bool:
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 - no CuPy, or no libnvrtc on this machine
        return False
    return True


@pytest.mark.skipif(not _nvrtc_loads(), reason="NVRTC does not load here (CuPy's libnvrtc)")
def test_nvrtc_builds_wgmma_instances_for_sm90a() -> None:
    """The run-time build (NVRTC through CuPy, no standard headers, `--gpu-architecture=sm_90a`)
    of both bit widths and split flags: what nvcc's static build cannot see (it has <cstdint>)."""
    from gemmtune.kernels.buildcheck import wgmma_variants
    from gemmtune.kernels.compile import nvrtc_cubin

    for v in wgmma_variants((4, 8), quick=True)[:4]:
        cubin, lowered = nvrtc_cubin(v, v.arch)
        assert cubin[:4] == b"\x7fELF" and lowered.startswith("_ZN8gemmtune15gptq_wgmma_gemm")
