"""Reports of a comparison: Markdown (`render_markdown`) and a PNG plot (`plot`): latency against
M per problem, log-x, both curves, a vertical marker at each config's fused/reconstruct switch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from gemmtune.autotune.regression import Comparison, Row
from gemmtune.autotune.results import BenchResults, CompareError


def pct(ratio: float) -> str:
    """`+8.3 %` slower / `-4.1 %` faster, as B relative to A."""
    return f"{(ratio - 1) * 100:+.1f} %"


def _config_line(r: BenchResults) -> str:
    keys = sorted({pb.config.key() for pb in r.problems})
    return ", ".join(f"`{k}`" for k in keys)


def render_markdown(c: Comparison, title: str | None = None) -> str:
    """The comparison as a Markdown document: what was compared, on what, the table, geomeans."""
    a, b = c.a, c.b
    lines = [f"# {title or f'{a.label} vs {b.label}'}", ""]
    lines.append(f"- **A**: `{a.label}` — {a.provenance or a.label}; configs {_config_line(a)}")
    lines.append(f"- **B**: `{b.label}` — {b.provenance or b.label}; configs {_config_line(b)}")
    dev = a.device
    lines.append(f"- **Card**: {dev.get('name', '?')} (sm_{str(dev.get('compute_capability', '?')).replace('.', '')}, "
                 f"{dev.get('sm_count', '?')} SMs, driver {dev.get('driver_version') or '?'}), "
                 f"fingerprint `{a.fingerprint}`")
    lines.append(f"- **Kernel hash**: `{a.kernel_hash[:16]}`")
    how = ("interleaved A B A B on the same card" if a.mode == b.mode == "interleaved"
           else "separate runs (results files)")
    lines.append(f"- **Measured**: {a.created_at.strftime('%Y-%m-%d %H:%M UTC')}, {how}; "
                 "whole dispatch per call, CUDA-graph replays, median ± interquartile range")
    lines.append(f"- **Command**: `{b.command if a.mode == 'interleaved' else a.command}`")
    lines.append(f"- **Rule**: regression when B/A > {1 + c.threshold:.3g} and B − A > spread A + "
                 "spread B")
    for w in c.warnings:
        lines.append(f"- **Warning**: {w}")
    for lo in c.left_out:
        lines.append(f"- **Left out**: {lo}")
    lines += ["", "| shape | M | path A→B | A µs | B µs | B/A | |", "|---|---:|---|---:|---:|---:|---|"]
    for r in c.rows:
        lines.append(
            f"| {r.problem_key} | {r.m} | {r.a.path}→{r.b.path} | {r.a.median_us:.2f} ± "
            f"{r.a.spread_us:.2f} | {r.b.median_us:.2f} ± {r.b.spread_us:.2f} | {r.ratio:.3f} | "
            f"{'**REGRESSION**' if r.regression else r.flag} |")
    lines += ["", "| shape (layers) | geomean B/A |", "|---|---:|"]
    layers = {r.problem_key: r.layers for r in c.rows}
    for key, g in c.geomean_by_problem().items():
        names = ", ".join(layers.get(key, ()))
        lines.append(f"| {key}{f' ({names})' if names else ''} | {g:.3f} ({pct(g)}) |")
    lines.append(f"| **all** | **{c.geomean:.3f} ({pct(c.geomean)})** |")
    lines.append("")
    n = len(c.regressions)
    lines.append(f"{n} regression{'s' if n != 1 else ''} and {len(c.improvements)} "
                 f"improvement{'s' if len(c.improvements) != 1 else ''} of {len(c.rows)} points "
                 f"(threshold {c.threshold * 100:g} %).")
    return "\n".join(lines) + "\n"


PLOT_INSTALL_HINT = "pip install -e '.[plot]' in the gemmtune checkout"


def _matplotlib() -> Any:
    """matplotlib with the file-only Agg backend, or CompareError with the install hint."""
    try:
        import matplotlib
    except ImportError:
        raise CompareError(f"--plot needs matplotlib, which is not installed: "
                           f"{PLOT_INSTALL_HINT}") from None
    matplotlib.use("Agg")
    return matplotlib


def check_output(path: str | Path, what: str) -> None:
    """Fail now, not after minutes of measuring, when `path` cannot become the output file:
    it is a directory, or its nearest existing ancestor is not a writable folder."""
    target = Path(path)
    if target.is_dir():
        raise CompareError(f"{what} {target} is a directory; give a file name")
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CompareError(f"cannot write {what} {target}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CompareError(f"cannot write {what} {target}: folder {ancestor} is not writable")


def check_plot(path: str | Path) -> None:
    """Everything `plot` needs that can be checked before measuring: matplotlib is installed,
    it can write the file's format (from its suffix), and the file can be written."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise CompareError(f"--plot {path}: the file name must end in one of "
                           f"{', '.join('.' + f for f in sorted(formats))} (it picks the format)")
    check_output(path, "--plot")


def plot(c: Comparison, path: str | Path, title: str | None = None) -> None:
    """Latency against M (log-x) per problem, both curves, dashed verticals where each config
    switches from the fused kernel to reconstruct + cuBLAS (its max_q_gemm_rows)."""
    check_plot(path)
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups: dict[str, list[Row]] = {}
    for r in c.rows:
        groups.setdefault(r.problem_key, []).append(r)
    cfg_a, cfg_b = c.a.by_key(), c.b.by_key()
    n = len(groups)
    cols = 2 if n > 1 else 1
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.0 * cols, 3.6 * rows_n), squeeze=False)
    colors = ("tab:blue", "tab:orange")
    for idx, (key, rows) in enumerate(groups.items()):
        ax = axes[idx // cols][idx % cols]
        ms = [r.m for r in rows]
        for side, (label, pts, cmap, color) in enumerate((
                (c.a.label, [r.a for r in rows], cfg_a, colors[0]),
                (c.b.label, [r.b for r in rows], cfg_b, colors[1]))):
            ys = [p.median_us for p in pts]
            es = [p.spread_us / 2 for p in pts]
            ax.errorbar(ms, ys, yerr=es, marker="o" if side == 0 else "s", ms=3.5, lw=1.4,
                        color=color, label=f"{'AB'[side]}: {label}", capsize=2)
            pb = cmap.get(key)
            if pb is not None and min(ms) <= pb.config.max_q_gemm_rows < max(ms):
                # B's marker a hair to the right, so equal thresholds show both colours
                ax.axvline(pb.config.max_q_gemm_rows * (1 + 0.03 * side), color=color, ls="--",
                           lw=1.0, alpha=0.8)
                ax.annotate(f"fused ≤ {pb.config.max_q_gemm_rows}", (pb.config.max_q_gemm_rows, 1),
                            xycoords=("data", "axes fraction"), xytext=(3, -12 - 11 * side),
                            textcoords="offset points", fontsize=7, color=color)
        bad = [r for r in rows if r.regression]
        if bad:
            ax.scatter([r.m for r in bad], [r.b.median_us for r in bad], s=70, facecolors="none",
                       edgecolors="red", lw=1.3, zorder=5, label="regression")
        layers = ", ".join(rows[0].layers)
        ax.set_title(key + (f"  ({layers})" if layers else ""), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks([2**i for i in range(20) if min(ms) <= 2**i <= max(ms)])
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("M (rows of A)")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower right")
    for idx in range(n, rows_n * cols):
        axes[idx // cols][idx % cols].axis("off")
    dev = c.a.device.get("name", "?")
    fig.suptitle(title or f"{c.a.label} vs {c.b.label} on {dev} (geomean B/A {c.geomean:.3f})",
                 fontsize=11)
    fig.tight_layout()
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
    except OSError as exc:
        raise CompareError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
