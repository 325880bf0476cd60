"""Static build of every kernel variant with `nvcc` (no GPU needed): `gemmtune kernels check`.

Each template instance the dispatch can launch (decode kernel, tiled kernel, stream kernel, reconstruct) is
instantiated explicitly and compiled for the requested architectures (the wgmma kernel, which
exists on sm_90 cards only, for sm_90a whenever sm_90 or sm_90a is requested); ptxas' resource report gives registers, spill bytes and shared memory
per instance. Any build failure or spill fails the check: a spilling variant would be slow on
every card, and one that does not build would only fail at run time on a user's machine.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .compile import FusedVariant, ReconVariant, StreamVariant, TiledVariant, Variant, WgmmaVariant
from .config import (
    TILES,
    TUNABLES,
    WGMMA_ARCH,
    WGMMA_TILES,
    KernelConfig,
    launch_violation,
    stream_violation,
    tiled_shape,
    tiled_violation,
    wgmma_shape,
    wgmma_violation,
)
from .errors import KernelBuildError
from .problem import KERNEL_BITS
from .sources import COMMON_FLAGS, CUDA_DIR

_CHOICES = {t.name: t.choices for t in TUNABLES}


def fused_variants(bits: Iterable[int] = KERNEL_BITS, quick: bool = False) -> list[FusedVariant]:
    """Every fused-kernel instance reachable from the configuration space."""
    rows = _CHOICES["max_q_gemm_rows_kernel"]
    warps = (1, 2, 4, 8)
    unrolls = (1, 2, 4, 8)
    out = []
    for b, r, wn, wk, u, act, split in itertools.product(bits, rows, warps, warps, unrolls,
                                                         (False, True), (False, True)):
        if wn * wk > 16 or launch_violation(32 * wn, 32 * wn * wk, r, u) is not None:
            continue  # 16 warps: the 512 threads of the tunables' range
        out.append(FusedVariant(b, r, wn, wk, u, act, split))
    if quick:
        keep = {(4, 8, 2, 1, 4), (4, 16, 2, 1, 4), (4, 64, 2, 4, 1), (4, 4, 2, 1, 4), (8, 8, 2, 1, 4),
                (4, 1, 1, 1, 1), (8, 64, 8, 2, 1), (4, 32, 4, 4, 2), (8, 3, 1, 8, 8)}
        out = [v for v in out if (v.bits, v.m_count, v.warps_n, v.warps_k, v.unroll) in keep]
    return out


def tiled_variants(bits: Iterable[int] = KERNEL_BITS, quick: bool = False) -> list[TiledVariant]:
    """Every tiled-kernel instance reachable from the configuration space: each built tile at
    each `tile_k` and `stages` choice that `tiled_violation` allows at that bit width (the same
    rule the dispatch applies when it binds a weight), with and without split-K (the dispatch
    picks the split per M, so a config launches both)."""
    out = []
    for b, (tm, tn), tk, st, split in itertools.product(
            bits, TILES, _CHOICES["tile_k"], _CHOICES["stages"], (False, True)):
        if tiled_violation(b, tm, tn, tk, st) is not None:
            continue
        wm, mt, wn, nw = TILES[(tm, tn)]
        out.append(TiledVariant(b, wm, mt, wn, nw, tiled_shape(b, tm, tn, tk)[0], st, split))
    if quick:
        # The default tile, the smallest, the largest the rule allows, 8-bit's longest stage and
        # its widest tile with four stages.
        keep = {(4, 64, 128, 64, 4), (4, 16, 64, 64, 2), (4, 128, 256, 64, 2), (8, 64, 128, 128, 4),
                (8, 64, 256, 64, 4), (8, 16, 128, 64, 3)}
        out = [v for v in out if (v.bits, v.tile_m, v.tile_n, v.tile_k, v.stages) in keep]
    return out


def wgmma_variants(bits: Iterable[int] = KERNEL_BITS, quick: bool = False) -> list[WgmmaVariant]:
    """Every wgmma-kernel instance reachable from the configuration space: each built tile at
    each `wgmma_k` and `wgmma_stages` choice `wgmma_violation` allows at that bit width, with and
    without split-K."""
    out = []
    for b, (tm, tn), tk, st, split in itertools.product(
            bits, WGMMA_TILES, _CHOICES["wgmma_k"], _CHOICES["wgmma_stages"], (False, True)):
        if wgmma_violation(b, tm, tn, tk, st) is not None:
            continue
        wgm, tok, wgn = WGMMA_TILES[(tm, tn)]
        out.append(WgmmaVariant(b, wgm, wgn, tok, wgmma_shape(b, tm, tn, tk)[0], st, split))
    if quick:
        # The default tile, the smallest, the widest, and 8-bit's longest stage.
        keep = {(4, 64, 256, 64, 4), (4, 16, 128, 64, 4), (4, 128, 256, 64, 4),
                (4, 256, 128, 64, 3), (8, 64, 256, 128, 4)}
        out = [v for v in out if (v.bits, v.tile_m, v.tile_n, v.tile_k, v.stages) in keep]
    return out


def stream_variants(bits: Iterable[int] = KERNEL_BITS, quick: bool = False,
                    clusters: bool = True) -> list[StreamVariant]:
    """Stream-kernel instances: every (warps, chunk, slots) the tunables' choices give (warps =
    warps_n x warps_k) that `stream_violation` allows, at each bit width, with and without
    act-order, one CTA per K slice. With `clusters` (sm_90 targets), also each of them as a
    cluster of 2, and the default block as a cluster of every `split_k` choice: the cluster size
    changes only the trip count of the reduction loop and the compiled cluster shape, so one size
    per block and every size of one block cover what the others compile to."""
    bits = tuple(bits)
    blocks = sorted({(wn * wk, ch, sl) for wn, wk, ch, sl in itertools.product(
        _CHOICES["stream_warps_n"], _CHOICES["stream_warps_k"], _CHOICES["stream_chunk"],
        _CHOICES["stream_slots"]) if stream_violation(wn, wk, ch, sl, 0) is None})
    out = [StreamVariant(b, *blk, act, 1) for b, blk, act in itertools.product(bits, blocks, (False, True))]
    if clusters:
        out += [StreamVariant(b, *blk, False, 2) for b, blk in itertools.product(bits, blocks)]
        d = KernelConfig()
        default = (d.stream_warps_n * d.stream_warps_k, d.stream_chunk, d.stream_slots)
        out += [StreamVariant(b, *default, act, c) for b, act, c in itertools.product(
            bits, (False, True), _CHOICES["split_k"]) if c > 2]
    if quick:
        keep = {(4, 8, 8, 2, False, 1), (8, 8, 8, 2, True, 1), (4, 16, 8, 2, False, 1),
                (4, 16, 4, 2, False, 2), (4, 8, 8, 2, True, 16), (8, 16, 4, 4, False, 1)}
        out = [v for v in out if (v.bits, v.warps, v.chunk, v.slots, v.act_order, v.cluster) in keep]
    return out


def recon_variants(bits: Iterable[int] = KERNEL_BITS) -> list[ReconVariant]:
    return [ReconVariant(b, act) for b in bits for act in (False, True)]


@dataclass
class BuildResult:
    variant: Variant
    arch: str
    ok: bool
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    """Static shared memory (ptxas) plus the dynamic shared memory the launch asks for."""
    message: str = ""


_KIND: dict[type, str] = {FusedVariant: "decode", TiledVariant: "tiled", WgmmaVariant: "wgmma",
                          ReconVariant: "reconstruct", StreamVariant: "stream"}
"""How the report names each kernel."""

_RE_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
# ptxas' note that it serialised an instance's wgmma (each waits for the previous): correct but
# far from the tensor rate, so the check counts it as a failure of that instance.
_RE_WGMMA_SERIAL = re.compile(r"wgmma\.mma_async instructions are serialized (due to .*?) in the "
                              r"function '(\S+)'")


def _instantiation(v: Variant) -> str:
    name = v.expression().replace("gemmtune::", "gemmtune::", 1)
    return f"template __global__ void {name}({v.signature()});\n"


def nvcc_path() -> str:
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if not nvcc or not os.path.exists(nvcc):
        raise KernelBuildError("nvcc not found on PATH (set CUDA_HOME or install the CUDA toolkit)")
    return nvcc


def build_batch(variants: list[Variant], arch: str, workdir: Path) -> list[BuildResult]:
    """Compile one translation unit holding `variants` for `arch`; parse ptxas' report."""
    sources = sorted({v.source for v in variants})
    tu = "".join(f'#include "{s}"\n' for s in sources) + "".join(_instantiation(v) for v in variants)
    src = workdir / f"check_{arch}_{abs(hash(tuple(variants)))}.cu"
    src.write_text(tu)
    # An arch-specific target ("sm_90a") in the -gencode form: nvcc 13.0's -arch=sm_90a shorthand
    # also runs a plain sm_90 pass, which rejects wgmma.
    target = (f"-gencode=arch=compute_{arch[3:]},code={arch}" if arch.endswith("a")
              else f"-arch={arch}")
    cmd = [nvcc_path(), *COMMON_FLAGS, target, f"-I{CUDA_DIR}", "-c", str(src),
           "-o", str(src.with_suffix(".o")), "-Xptxas", "-v", "-w"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        first = next((ln for ln in log.splitlines() if "error" in ln), log.strip()[-300:])
        return [BuildResult(v, arch, False, message=first) for v in variants]
    by_mangled: dict[str, BuildResult] = {}
    serialised = {m.group(2): m.group(1) for m in _RE_WGMMA_SERIAL.finditer(log)}
    current: BuildResult | None = None
    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            current = BuildResult(None, arch, True)  # type: ignore[arg-type]
            by_mangled[m.group(1)] = current
            if m.group(1) in serialised:
                current.ok = False
                current.message = f"ptxas serialises its wgmma ({serialised[m.group(1)]})"
            continue
        if current is None:
            continue
        m = _RE_SPILL.search(line)
        if m:
            current.spill_bytes = int(m.group(1)) + int(m.group(2))
        m = _RE_REGS.search(line)
        if m:
            current.registers = int(m.group(1))
            current.shared_bytes = int(m.group(2) or 0)
    # Mangled names list template arguments in order; match each variant to its entry.
    results = []
    for v in variants:
        args = _mangled_args(v)
        match = next((r for name, r in by_mangled.items() if args in name), None)
        if match is None:
            results.append(BuildResult(v, arch, False, message="no ptxas report for this instance"))
        else:
            match.variant = v
            # The tiled kernel's stages live in dynamic shared memory, which ptxas does not see.
            match.shared_bytes += int(getattr(v, "smem_bytes", 0))
            results.append(match)
    return results


def _mangled_args(v: Variant) -> str:
    def i(x: int) -> str:
        return f"Li{x}E"

    def b(x: bool) -> str:
        return f"Lb{int(x)}E"

    if isinstance(v, FusedVariant):
        name = "gptq_gemm"
        args = [i(v.bits), i(v.m_count), i(v.warps_n), i(v.warps_k), i(v.unroll), b(v.act_order), b(v.split)]
    elif isinstance(v, TiledVariant):
        name = "gptq_tiled_gemm"
        args = [i(v.bits), i(v.warps_m), i(v.mt), i(v.warps_n), i(v.nw), i(v.ks), i(v.stages),
                b(v.split)]
    elif isinstance(v, StreamVariant):
        name = "gptq_stream_gemm" if v.cluster == 1 else "gptq_stream_gemm_cluster"
        args = [i(v.bits), i(v.warps), i(v.chunk), i(v.slots), b(v.act_order)]
        args += [i(v.cluster)] if v.cluster > 1 else []
    elif isinstance(v, WgmmaVariant):
        name = "gptq_wgmma_gemm"
        args = [i(v.bits), i(v.wgm), i(v.wgn), i(v.tn), i(v.ks), i(v.stages), b(v.split)]
    else:
        name = "gptq_reconstruct"
        args = [i(v.bits), b(v.act_order)]
    return f"{len(name)}{name}I" + "".join(args) + "E"


def run_check(archs: list[str], bits: list[int], jobs: int, quick: bool, console) -> bool:  # noqa: ANN001
    from rich.progress import Progress
    from rich.table import Table

    # A check that builds nothing must not pass (a CI gate with an empty list would be green).
    if not archs:
        raise KernelBuildError("no target to build: give --arch, e.g. sm_90")
    if not bits:
        raise KernelBuildError(f"no bit width to build: give --bits, e.g. {','.join(map(str, KERNEL_BITS))}")
    for b in bits:
        if b not in KERNEL_BITS:
            raise KernelBuildError(f"no CUDA kernel for {b}-bit weights (kernels: {KERNEL_BITS})")
    for a in archs:
        if not re.fullmatch(r"sm_\d{2,3}a?", a):
            raise KernelBuildError(f"--arch {a!r} is not of the form sm_90")
    variants: list[Variant] = [*fused_variants(bits, quick), *tiled_variants(bits, quick),
                               *recon_variants(bits)]
    batch = 24
    batches = [(variants[i:i + batch], a) for a in archs for i in range(0, len(variants), batch)]
    if any(a in ("sm_90", WGMMA_ARCH) for a in archs):
        # The wgmma family exists for sm_90 cards and is built for their arch-specific target.
        wv = wgmma_variants(bits, quick)
        step = 8  # large unrolled instances: smaller batches keep the worker threads busy
        batches += [(list(wv[i:i + step]), WGMMA_ARCH) for i in range(0, len(wv), step)]
    for a in archs:
        # Thread-block clusters exist from sm_90: its targets build the cluster instances too.
        sv = stream_variants(bits, quick, clusters=int(re.sub(r"\D", "", a)) >= 90)
        batches += [(sv[i:i + batch], a) for i in range(0, len(sv), batch)]
    results: list[BuildResult] = []
    with tempfile.TemporaryDirectory(prefix="gemmtune-check-") as tmp, Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"nvcc {sum(len(b) for b, _ in batches)} builds", total=len(batches))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for res in pool.map(lambda job: build_batch(job[0], job[1], Path(tmp)), batches):
                results.extend(res)
                progress.advance(task)
    bad = [r for r in results if not r.ok or r.spill_bytes]
    table = Table(title=f"kernel variants built with nvcc ({len(results)} builds)")
    for col in ("arch", "kernel", "variants", "regs max", "spill bytes", "smem max", "failed"):
        table.add_column(col)
    groups: dict[tuple[str, str], list[BuildResult]] = {}
    for r in results:
        kind = _KIND[type(r.variant)]
        groups.setdefault((r.arch, f"{kind} {r.variant.bits}-bit"), []).append(r)
    for (arch, kind), rs in sorted(groups.items()):
        table.add_row(arch, kind, str(len(rs)), str(max(r.registers for r in rs)),
                      str(sum(r.spill_bytes for r in rs)), str(max(r.shared_bytes for r in rs)),
                      str(sum(not r.ok for r in rs)))
    console.print(table)
    for r in bad[:20]:
        what = r.message if not r.ok else f"{r.spill_bytes} bytes spilled ({r.registers} registers)"
        console.print(f"[red]FAIL[/] {r.arch} {r.variant.expression()}: {what}", highlight=False)
    if bad:
        console.print(f"[red]{len(bad)} of {len(results)} builds failed or spilled[/]")
        return False
    console.print(f"[green]all {len(results)} builds clean[/] (no failures, no spills)")
    return True
