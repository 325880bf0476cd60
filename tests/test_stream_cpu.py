"""The stream decode kernel's rules, keys and launch plan, without a GPU."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from gemmtune.autotune.space import FULL, STANDARD, STREAM_START, families_on
from gemmtune.kernels.buildcheck import _mangled_args, stream_variants
from gemmtune.kernels.config import (
    STREAM,
    STREAM_ROWS,
    KernelConfig,
    stream_a_row_bytes,
    stream_fixed_smem,
    stream_partial_row_bytes,
    stream_recv_row_bytes,
    stream_smem_bytes,
    stream_violation,
)
from gemmtune.kernels.errors import InvalidConfigError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.stream import StreamPlan

H100 = SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=227 * 1024,
                       name="H100 (fake)", major=9, minor=0)
A100 = SimpleNamespace(multi_processor_count=108, shared_memory_per_block_optin=163 * 1024,
                       name="A100 (fake)", major=8, minor=0)


def stream(**kw: int) -> KernelConfig:
    return KernelConfig(kernel=STREAM, **kw)


def plan(k: int, n: int, cfg: KernelConfig, props=H100, per_sm: int | None = None) -> StreamPlan:  # noqa: ANN001
    """A StreamPlan whose residency is computed from shared memory alone (no driver): one CTA
    per 228 KB of an SM, whole clusters."""
    p = StreamPlan(Problem(k, n), cfg, 0, props, (None, None, None), 7)

    def resident(cluster: int, smem: int) -> int:
        fits = per_sm if per_sm is not None else max(0, 228 * 1024 // (smem + 1024))
        return props.multi_processor_count * fits // cluster * cluster
    p.resident = resident  # type: ignore[method-assign]
    p.fn = lambda cluster: f"kernel with clusters of {cluster}"  # type: ignore[method-assign]
    return p


def test_keys_name_the_stream_block_and_round_trip() -> None:
    cfg = stream(stream_warps_n=2, stream_warps_k=4, stream_chunk=4, stream_slots=3, split_k=8)
    assert cfg.stream and not cfg.tiled and not cfg.wgmma
    assert cfg.variant_key() == "stream2x4-ch4-sl3-sk8"
    assert cfg.key().endswith("-stream2x4-ch4-sl3")
    assert KernelConfig.from_variant_key(cfg.variant_key()) == cfg.replace(max_q_gemm_rows=64)
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    # Another family's config never spells the stream fields, and a key stored before the stream
    # family existed (no stream fields) still reads back as what it was.
    assert "stream" not in KernelConfig().key()
    old = {k: v for k, v in KernelConfig().to_dict().items() if not k.startswith("stream_")}
    assert KernelConfig.from_dict(old) == KernelConfig()


def test_the_fields_of_the_stream_family_stay_at_defaults_elsewhere() -> None:
    with pytest.raises(InvalidConfigError, match="stream_slots is not read by the decode kernel"):
        KernelConfig(stream_slots=4)
    with pytest.raises(InvalidConfigError, match="block_n, threads are not read by the stream kernel"):
        stream(block_n=128, threads=128)


def test_stream_violation_says_why() -> None:
    assert stream_violation(1, 8, 8, 2, 0) is None
    assert "512" in stream_violation(4, 8, 4, 2, 0)  # 1024 threads
    assert "cluster" in stream_violation(1, 8, 8, 2, 32)
    assert "shared memory" in stream_violation(1, 16, 16, 8, 0)
    with pytest.raises(InvalidConfigError, match="cluster"):
        stream(split_k=17)
    assert KernelConfig(split_k=32).split_k == 32  # the decode kernel's split is not a cluster
    # Smaller cards: the rings are checked against their own limit.
    assert stream_violation(1, 8, 16, 2, 0, smem_limit=99 * 1024) is not None


def test_shared_memory_grows_with_what_a_block_holds() -> None:
    base = stream_fixed_smem(1, 8, 8, 2)
    assert stream_fixed_smem(1, 8, 8, 4) > base and stream_fixed_smem(2, 8, 8, 2) > base
    # A row of A is the block's K slice (+16 bytes): halved by a cluster of 2, 4-bit and 8-bit
    # hold the same halves.
    assert stream_a_row_bytes(4, 4096, 1) == 4096 * 2 + 16
    assert stream_a_row_bytes(4, 4096, 2) == 2048 * 2 + 16
    assert stream_a_row_bytes(8, 4096, 1) == stream_a_row_bytes(4, 4096, 1)
    assert stream_a_row_bytes(4, 640, 8) == 3 * 32 * 2 + 16  # 20 steps over 8: the longer slice
    # The partials: a 32-column fp32 slot per row for each (warp, tile) pair a run can end in.
    assert stream_partial_row_bytes(8, 1) == 8 * 128 and stream_partial_row_bytes(8, 14) == 21 * 128
    assert stream_smem_bytes(4, 1, 8, 8, 2, 3, 4096, 1, 2) == base + 3 * (4096 * 2 + 16 + 9 * 128)
    # A cluster adds a slot a row for each quad pushed to it (none without a cluster): 8 quads
    # of 16 bytes a tile, and 8 more quads at 16 CTAs, where rounding to the cluster can add them.
    assert stream_recv_row_bytes(1, 5) == 0
    assert stream_recv_row_bytes(4, 5) == 5 * 128 and stream_recv_row_bytes(16, 5) == 6 * 128
    assert (stream_smem_bytes(4, 1, 8, 8, 2, 3, 4096, 2, 2)
            == base + 3 * (2048 * 2 + 16 + 9 * 128 + 2 * 128))
    # Two mbarriers beside the rings' (A's bulk copy, the pushes'), padded to 16 bytes.
    assert stream_fixed_smem(1, 1, 1, 2) == 1 * 2 * (512 + 128) + 32


def test_pushed_sums_fill_each_owners_slots_once() -> None:
    """The cluster reduction's mapping, replayed with the kernel's formulas: quad i goes to CTA
    i % CLUSTER, into slot (i - i % CLUSTER) + rank. Every owner gets exactly one sum from every
    rank for each quad it owns, the pushes it waits for are the bytes its barrier expects, and
    every slot lies inside what `stream_recv_row_bytes` sizes."""
    for cluster in (2, 4, 8, 16):
        for t_max in (1, 2, 3, 5, 17):
            for m in range(1, STREAM_ROWS + 1):
                recv_quads = -(-t_max * m * 8 // cluster) * cluster
                assert recv_quads * 16 <= m * stream_recv_row_bytes(cluster, t_max)
                for n_t in {1, max(1, t_max - 1), t_max}:
                    quads = n_t * m * 8
                    got: dict[int, dict[int, int]] = {r: {} for r in range(cluster)}
                    for rank in range(cluster):
                        for i in range(quads):
                            owner = i % cluster
                            slot = i - owner + rank
                            assert 0 <= slot < recv_quads
                            assert slot not in got[owner]
                            got[owner][slot] = i
                    for rank in range(cluster):
                        owned = [i for i in range(quads) if i % cluster == rank]
                        expect = (quads - rank + cluster - 1) // cluster if quads > rank else 0
                        assert len(owned) == expect
                        pushed = sum(1 for slot, i in got[rank].items() if slot - (i - rank) != rank)
                        assert pushed * 16 == (cluster - 1) * expect * 16
                        for i in owned:  # the owner reads slots i - rank + rr, rr = 0..cluster-1
                            assert [got[rank][i - rank + rr] for rr in range(cluster)] == [i] * cluster


def test_long_k_takes_fewer_rows_per_launch() -> None:
    p = plan(28672, 8192, stream(split_k=1))
    rows, grid, smem = p.layout(1, STREAM_ROWS)
    assert rows == p.rows_fit(1, 2) < STREAM_ROWS  # 256 tiles on 132 CTAs: 2 at most
    launches = p.launches(STREAM_ROWS)
    assert [ln.rows for ln in launches] == [rows] * (STREAM_ROWS // rows)
    assert [ln.row0 for ln in launches] == list(range(0, STREAM_ROWS, rows))
    assert all(ln.smem == smem <= H100.shared_memory_per_block_optin and ln.grid == grid == 132
               for ln in launches)


def test_a_row_that_does_not_fit_is_refused_when_bound() -> None:
    cfg = stream(stream_warps_k=8, stream_chunk=16, stream_slots=2, split_k=1)
    with pytest.raises(InvalidConfigError, match="does not fit"):
        plan(40960, 64, cfg)  # 80 KB of A a row, 160 KB of rings
    assert plan(40960, 64, cfg.replace(split_k=2)).rows_fit(2, 1) >= 1


def test_more_rows_than_one_launch_holds_are_more_launches() -> None:
    p = plan(4096, 4096, stream(split_k=1))
    got = p.launches(2 * STREAM_ROWS + 1)
    assert [(ln.row0, ln.rows) for ln in got] == [(0, 8), (8, 8), (16, 1)]
    assert [(ln.row0, ln.rows) for ln in p.launches(3)] == [(0, 3)]


def test_auto_cluster_fills_one_wave_and_the_grid_never_exceeds_it() -> None:
    # 4096 x 1024: 32 column tiles, far fewer than 132 SMs: K is split across a cluster.
    p = plan(4096, 1024, stream(split_k=0), per_sm=1)
    cluster, rows = p.choose(1)
    assert cluster == 4 and rows == 1  # 128 CTAs of 132
    (ln,) = p.launches(1)
    assert ln.grid == 32 * 4 and ln.grid % cluster == 0
    # 8192 x 57344: 1792 tiles, many a cluster: the grid is one wave of every SM.
    p = plan(8192, 57344, stream(split_k=0), per_sm=1)
    assert p.launches(1)[0].grid == 132
    # The grid never has more clusters than tiles, whatever the split.
    for split in (1, 2, 4, 8):
        (ln,) = plan(4096, 256, stream(split_k=split), per_sm=1).launches(1)
        assert ln.grid == 8 * split


def test_the_split_evens_out_what_the_busiest_cta_reads() -> None:
    # 4096 x 6144: 192 tiles on 132 SMs. One CTA per K slice leaves 60 CTAs with two tiles
    # (256 steps); clusters of 2 give each CTA at most 3 half tiles (192 steps): the mean is 186.
    p = plan(4096, 6144, stream(split_k=0), per_sm=1)
    assert p.choose(1)[0] == 2 and p.launches(1)[0].grid == 132
    # 5120 x 5120 (160 tiles): clusters of 4, 5 tiles of 40 steps a CTA, against 2 x 160 alone.
    assert plan(5120, 5120, stream(split_k=0), per_sm=1).choose(1)[0] == 4
    # 4096 x 28672 (896 tiles): 7 whole tiles a CTA alone is as even as any split: no cluster.
    assert plan(4096, 28672, stream(split_k=0), per_sm=1).choose(1)[0] == 1


def test_the_partials_grow_the_layout_until_the_wave_needs_no_more() -> None:
    # Two CTAs an SM fit: twice the clusters, so each takes half the tiles.
    p = plan(4096, 57344, stream(split_k=1), per_sm=2)
    rows, grid, smem = p.layout(1, 1)
    assert grid == 264 and smem == p.smem(1, 1, -(-1792 // 132))
    # Fewer resident CTAs than SMs: the partials are sized for the tiles each then takes.
    q = plan(4096, 57344, stream(split_k=1), per_sm=1)
    q.resident = lambda cluster, smem: 100  # type: ignore[method-assign]
    rows, grid, smem = q.layout(1, 8)
    assert grid == 100 and smem == q.smem(rows, 1, 18)  # ceil(1792 / 100)


def test_fewer_launches_beat_a_fuller_wave() -> None:
    # K = 28672, 8 rows: one CTA per K slice holds 2 rows (4 launches), a cluster of 4 all 8
    # (and loops over units: still better than reading the weight 4 times).
    p = plan(28672, 8192, stream(split_k=0))
    cluster, rows = p.choose(8)
    assert rows == 8 and cluster >= 4


def test_clusters_need_sm90() -> None:
    with pytest.raises(InvalidConfigError, match="sm_90"):
        plan(4096, 4096, stream(split_k=2), props=A100)
    assert plan(4096, 1024, stream(split_k=0), props=A100).clusters == [1]


def test_the_space_holds_the_stream_family() -> None:
    for space in (STANDARD, FULL):
        fam = space.family(STREAM)
        assert space.family_size(STREAM) > 0 and [f.name for f in fam.factors] == ["stream_tile"]
        assert all(cfg.threads == KernelConfig().threads for cfg in space.variants() if cfg.stream)
    assert STANDARD.contains(STREAM_START)
    assert all(FULL.contains(c) for c in STANDARD.variants() if c.stream)
    assert STREAM in families_on("8.0") and STREAM in families_on("9.0")


def test_the_static_build_covers_stream_instances() -> None:
    every = stream_variants()
    assert {v.cluster for v in every} == {1, 2, 3, 4, 6, 8, 12, 16}
    assert {v.cluster for v in stream_variants(clusters=False)} == {1}
    # Each (block, bits, act-order, cluster) compiles once, under a name no other has.
    assert len({_mangled_args(v) for v in every}) == len(every)
    default = KernelConfig()
    blocks = {(v.warps, v.chunk, v.slots) for v in every}
    assert (default.stream_warps_n * default.stream_warps_k, default.stream_chunk,
            default.stream_slots) in blocks
    assert all(stream_violation(1, *b, 0) is None for b in blocks)
    # warps_n x warps_k is one block of warps: (1, 8) and (2, 4) compile to the same instance.
    assert len({(v.warps, v.chunk, v.slots, v.bits, v.act_order, v.cluster) for v in every}) == len(every)


def test_tables_spell_a_stream_config_by_its_own_fields() -> None:
    from gemmtune.cli._common import _config_short

    cfg = stream(max_q_gemm_rows=8, stream_warps_n=2, stream_warps_k=4, split_k=4)
    assert _config_short(cfg) == "≤8 fused, stream 2x4 ch8 sl2 sk4"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_stream_instances_build_without_spills(arch: str) -> None:
    """One CTA per K slice builds from sm_80 (cp.async into the ring), clusters on sm_90 (bulk
    copies, distributed shared memory); each instance matched to its own ptxas report."""
    import tempfile
    from pathlib import Path

    from gemmtune.kernels.buildcheck import build_batch

    variants = stream_variants((4, 8), quick=True, clusters=arch == "sm_90")
    assert any(v.cluster > 1 for v in variants) == (arch == "sm_90")
    with tempfile.TemporaryDirectory() as tmp:
        results = build_batch(variants, arch, Path(tmp))
    for v, r in zip(variants, results, strict=True):
        assert r.variant is v and r.ok, r.message
        assert 0 < r.registers <= 65536 // v.threads and r.spill_bytes == 0


def test_warp_runs_cover_every_step_once_and_their_slots_never_collide() -> None:
    """The kernel's work split, replayed in Python with its formulas (gptq_stream_gemm.cu:
    run_begin, run_of, the chunk grid, slot tile + warp): over random layouts every (tile, step)
    is read by exactly one warp of one CTA, a chunk never spans two tiles or more than CHUNK
    steps, no two (warp, tile) partials share a slot, every slot lies inside the partials
    `stream_partial_row_bytes` sizes, and the covering warps of each tile are exactly those
    that wrote a partial of it."""
    import random

    rng = random.Random(7)

    def run_begin(w: int, n_t: int, sl: int, warps: int) -> int:
        return w * n_t * sl // warps

    def run_of(p: int, n_t: int, sl: int, warps: int) -> int:
        return ((p + 1) * warps - 1) // (n_t * sl)

    for _ in range(400):
        tiles, steps = rng.randint(1, 300), rng.randint(1, 60)
        cluster = rng.choice([c for c in (1, 2, 3, 4, 8) if c <= steps])
        warps, chunk = rng.choice((1, 2, 4, 8, 16)), rng.choice((1, 2, 4, 8, 16))
        clusters = rng.randint(1, min(tiles, max(1, 132 // cluster)))
        t_max = -(-tiles // clusters)
        n_slots = stream_partial_row_bytes(warps, t_max) // 128
        seen: set[tuple[int, int]] = set()
        for cid in range(clusters):
            t_lo = tiles * cid // clusters
            n_t = tiles * (cid + 1) // clusters - t_lo
            assert 1 <= n_t <= t_max
            for rank in range(cluster):
                k_lo = steps * rank // cluster
                sl = steps * (rank + 1) // cluster - k_lo
                cpt = -(-sl // chunk)
                writers: dict[int, tuple[int, int]] = {}
                for w in range(warps):
                    p_lo, p_hi = run_begin(w, n_t, sl, warps), run_begin(w + 1, n_t, sl, warps)
                    if p_hi == p_lo:
                        continue
                    tl0 = p_lo // sl
                    piece0 = (p_lo - tl0 * sl) // chunk
                    total = (p_hi - 1) // sl * cpt + (p_hi - 1) % sl // chunk - (tl0 * cpt + piece0) + 1
                    tl, piece = tl0, piece0  # the kernel's cursor: no division per chunk
                    for j in range(total):
                        if j:
                            piece += 1
                            if piece == cpt:
                                tl, piece = tl + 1, 0
                        s_a = max(piece * chunk, p_lo - tl * sl)
                        s_b = min(piece * chunk + chunk, sl, p_hi - tl * sl)
                        assert 0 <= s_a < s_b <= sl and s_b - s_a <= chunk
                        for s in range(s_a, s_b):
                            key = (t_lo + tl, k_lo + s)
                            assert key not in seen
                            seen.add(key)
                        assert writers.setdefault(tl + w, (w, tl)) == (w, tl)  # one pair a slot
                assert all(slot < n_slots for slot in writers)
                for tl in range(n_t):
                    w0, w1 = run_of(tl * sl, n_t, sl, warps), run_of((tl + 1) * sl - 1, n_t, sl, warps)
                    covering = {w for w in range(w0, w1 + 1)
                                if run_begin(w + 1, n_t, sl, warps) > run_begin(w, n_t, sl, warps)}
                    assert covering == {w for w, t in writers.values() if t == tl}
        assert len(seen) == tiles * steps
