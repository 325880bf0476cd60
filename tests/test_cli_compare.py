"""`gemmtune bench` and `gemmtune compare` end to end on CPU: results files (no GPU), and the GPU
seams of `autotune.study` replaced by a fake evaluator for the measuring paths. What a CI job
relies on: the exit status (0 / 1 on regression only / 2 on any error), the one-line errors,
reported before anything is measured, and the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gemmtune.autotune import compare as cmp
from gemmtune.kernels.config import PRESETS
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem

from gemmtune.cli import main
from gemmtune.cli._common import _config_short
from tests.test_compare import P1, P2, results


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write(tmp: Path, name: str, r: cmp.BenchResults) -> str:
    path = tmp / name
    r.save(path)
    return str(path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str, str]:
    """Base results, a copy 10 % slower at M=1 of P1, and an identical copy."""
    base = {P1: {1: (10.0, 0.1), 4: (12.0, 0.1)}, P2: {1: (30.0, 0.2), 4: (31.0, 0.2)}}
    slow = {P1: {1: (11.0, 0.1), 4: (12.1, 0.1)}, P2: {1: (30.0, 0.2), 4: (30.9, 0.2)}}
    return (write(tmp_path, "base.json", results("main", base)),
            write(tmp_path, "slow.json", results("pr", slow)),
            write(tmp_path, "same.json", results("main", base)))


def test_regression_exits_1_with_table_and_geomean(pair: tuple[str, str, str]) -> None:
    base, slow, _ = pair
    r = run("compare", base, slow)
    assert r.exit_code == 1, r.output
    assert "REGRESSION" in r.output
    assert "1.100" in r.output  # the flagged ratio
    assert "geomean B/A overall" in r.output
    assert "1 regression" in r.output


def test_no_regression_exits_0(pair: tuple[str, str, str]) -> None:
    base, _, same = pair
    r = run("compare", base, same)
    assert r.exit_code == 0, r.output
    assert "no regression" in r.output
    assert "1.000" in r.output


def test_threshold_decides(pair: tuple[str, str, str]) -> None:
    base, slow, _ = pair
    assert run("compare", base, slow, "--threshold", "15%").exit_code == 0
    assert run("compare", base, slow, "--threshold", "0.05").exit_code == 1
    # the other direction: B faster is never a regression
    r = run("compare", slow, base)
    assert r.exit_code == 0 and "faster" in r.output


def test_spread_decides(tmp_path: Path) -> None:
    a = write(tmp_path, "a.json", results("a", {P1: {1: (10.0, 0.6)}}))
    b = write(tmp_path, "b.json", results("b", {P1: {1: (11.0, 0.6)}}))  # 1 µs < 1.2 µs of noise
    assert run("compare", a, b).exit_code == 0
    c = write(tmp_path, "c.json", results("c", {P1: {1: (11.0, 0.3)}}))
    assert run("compare", a, c).exit_code == 1


def test_reports_are_written(pair: tuple[str, str, str], tmp_path: Path) -> None:
    base, slow, _ = pair
    md, png, js = tmp_path / "o" / "c.md", tmp_path / "o" / "c.png", tmp_path / "o" / "c.json"
    r = run("compare", base, slow, "--report", str(md), "--plot", str(png), "--json", str(js))
    assert r.exit_code == 1  # files are written even when the gate fails
    assert "| shape | M |" in md.read_text() and "**REGRESSION**" in md.read_text()
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    doc = json.loads(js.read_text())
    assert doc["regressions"] == 1 and len(doc["rows"]) == 4


def test_mismatches_warn_and_compare_the_intersection(tmp_path: Path) -> None:
    other = DeviceInfo("nvidia", "NVIDIA A100-SXM4-80GB", "8.0", 108, 80 * 2**30)
    a = write(tmp_path, "a.json", results("a", {P1: {1: (10.0, 0.1), 2: (10.0, 0.1)},
                                                P2: {1: (5.0, 0.1)}}))
    b = write(tmp_path, "b.json", results("b", {P1: {1: (10.0, 0.1)}}, device=other,
                                          kernel_hash="f" * 64))
    r = CliRunner().invoke(main, ["compare", a, b], catch_exceptions=False)
    assert r.exit_code == 0
    assert "different cards" in r.output and "different kernel builds" in r.output
    assert "only in A" in r.output and P2.key() in r.output


def test_filters_apply_to_results_files(pair: tuple[str, str, str]) -> None:
    base, slow, _ = pair
    # the regression is at P1, M=1: leave it out either way
    assert run("compare", base, slow, "--shape", "14336x4096").exit_code == 0
    assert run("compare", base, slow, "--m", "4").exit_code == 0
    assert run("compare", base, slow, "--m", "1,4").exit_code == 1


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"format": "gemmtune-bench", "schema_version": 7}', "schema_version 7"),
    ('{"format": "gemmtune-bench", "schema_version": 1}', "missing field"),
    ("[1, 2]", "unknown source|neither a results file"),
])
def test_bad_files_one_clear_line(tmp_path: Path, pair: tuple[str, str, str], content: str,
                                  message: str) -> None:
    import re

    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r = CliRunner().invoke(main, ["compare", pair[0], str(bad)])
    assert r.exit_code == 2  # an error, never the "regression found" status
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert re.search(message, lines[0])


def test_usage_errors_exit_2(pair: tuple[str, str, str]) -> None:
    assert CliRunner().invoke(main, ["compare", pair[0]]).exit_code == 2
    assert CliRunner().invoke(main, ["compare", pair[0], pair[1], "--rounds", "1"]).exit_code == 2
    assert CliRunner().invoke(main, ["compare", pair[0], pair[1], "--workload", "x"]).exit_code == 2


def test_bad_threshold_and_unknown_source_are_one_line(pair: tuple[str, str, str]) -> None:
    r = CliRunner().invoke(main, ["compare", pair[0], pair[1], "--threshold", "lots"])
    assert r.exit_code == 2 and "threshold 'lots'" in r.output
    r = CliRunner().invoke(main, ["compare", "exllamav2-0.0.11", "fastest", "--shape", "4096x4096"])
    assert r.exit_code == 2 and "unknown source 'fastest'" in r.output


def test_measuring_needs_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemmtune.autotune import study as st

    monkeypatch.setattr(st, "gpu_count", lambda: 0)
    r = CliRunner().invoke(main, ["compare", "exllamav2-0.0.11", "exllamav2-0.0.12",
                                  "--model", "llama-2-70b"])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output
    r = CliRunner().invoke(main, ["compare", "exllamav2-0.0.11", "exllamav2-0.0.12"])
    assert r.exit_code == 2 and "nothing to measure" in r.output


def _error_line(r: Any) -> str:
    """The one `error:` line of a failed compare; exit 2 (1 would read as "regression")."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import matplotlib` fails, as on an install without the `plot` extra."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_plot_without_matplotlib_fails_before_measuring(fake_gpu: list[Any], no_matplotlib: None,
                                                        tmp_path: Path) -> None:
    png = tmp_path / "cmp.png"
    r = CliRunner().invoke(main, ["compare", "exllamav2-0.0.11", "exllamav2-0.0.12",
                                  "--model", "llama-2-70b", "--plot", str(png)])
    line = _error_line(r)
    assert "matplotlib" in line and "pip install -e '.[plot]'" in line
    assert fake_gpu == []  # nothing was measured
    assert not png.exists()


def test_plot_without_matplotlib_fails_before_comparing_files(pair: tuple[str, str, str],
                                                              no_matplotlib: None,
                                                              tmp_path: Path) -> None:
    report = tmp_path / "c.md"
    r = CliRunner().invoke(main, ["compare", pair[0], pair[1], "--plot", str(tmp_path / "c.png"),
                                  "--report", str(report)])
    assert "'.[plot]'" in _error_line(r)
    assert "REGRESSION" not in r.output and not report.exists()


@pytest.mark.parametrize("case", ["plot-format", "report-under-a-file",
                                  "missing-file", "tuned-in-memory", "tuned-bare-word",
                                  "bad-layout"])
def test_every_error_exits_2_before_measuring(fake_gpu: list[Any], tmp_path: Path,
                                              case: str) -> None:
    (tmp_path / "afile").write_text("x")
    args, words = {
        "plot-format": (["--plot", str(tmp_path / "cmp.txt")], ".png"),
        "report-under-a-file": (["--report", str(tmp_path / "afile" / "c.md")], "not a folder"),
        "missing-file": (["--shape", "4096x4096", "--db", str(tmp_path / "none.db")],
                         "no such file"),
        "tuned-in-memory": (["--db", "sqlite://"], "in-memory"),
        "tuned-bare-word": (["--db", "tuning"], "neither a URL nor a file path"),
        "bad-layout": (["--layout", "vllm"], "unknown layout 'vllm': choose transformers, separate, fused"),
    }[case]
    a, b = "exllamav2-0.0.11", ("tuned" if case.startswith("tuned") else "exllamav2-0.0.12")
    if case == "missing-file":
        b = str(tmp_path / "absent.json")
    r = CliRunner().invoke(main, ["compare", a, b, "--model", "llama-3-8b", *args])
    assert words in _error_line(r)
    assert fake_gpu == []


def test_compare_presets_measured_interleaved(fake_gpu: list[Any], tmp_path: Path) -> None:
    js = tmp_path / "c.json"
    r = run("compare", "exllamav2-0.0.11", "exllamav2-0.0.12", "--model", "llama-2-70b",
            "--m", "1,4,48", "--json", str(js))
    assert r.exit_code == 1, r.output  # the fake makes 4 rows per block slower: a regression
    assert len(fake_gpu) == 4  # llama-2-70b has four distinct shapes, one evaluator each
    doc = json.loads(js.read_text())
    assert doc["a"]["mode"] == "interleaved" and doc["a"]["source"]["label"] == "exllamav2-0.0.11"
    assert {row["m"] for row in doc["rows"]} == {1, 4, 48}
    # the default layout: the GEMMs gemmtune's runtime runs for a transformers Llama-2-70B
    # (q+k+v and gate+up fused), shared shapes once
    layers = {(p["problem"]["k"], p["problem"]["n"]): p["layers"] for p in doc["a"]["problems"]}
    assert layers == {(8192, 10240): ["q_proj+k_proj+v_proj×80"], (8192, 8192): ["o_proj×80"],
                      (8192, 57344): ["gate_proj+up_proj×80"], (28672, 8192): ["down_proj×80"]}
    assert "o_proj×80" in r.output


def test_compare_a_fused_layout_measures_the_engines_shapes(fake_gpu: list[Any]) -> None:
    r = run("compare", "exllamav2-0.0.11", "exllamav2-0.0.12", "--model", "llama-2-70b",
            "--layout", "fused", "--m", "1")
    assert r.exit_code == 1, r.output  # the fake's 4 rows per block are slower: a regression
    assert sorted((ev.problem.k, ev.problem.n) for ev in fake_gpu) == [
        (8192, 8192), (8192, 10240), (8192, 57344), (28672, 8192)]
    assert "qkv×80" in r.output and "gate_up×80" in r.output


def test_a_bad_layout_is_an_error_even_between_results_files(pair: tuple[str, str, str]) -> None:
    assert "unknown layout 'fuse'" in _error_line(
        CliRunner().invoke(main, ["compare", pair[0], pair[1], "--layout", "fuse"]))
    r = CliRunner().invoke(main, ["bench", pair[0], "--layout", "fuse"])
    assert r.exit_code == 1 and r.stderr.strip().startswith("error: unknown layout 'fuse'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_bench_writes_results_then_compare_against_a_live_source(fake_gpu: list[Any],
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "default.json"
    r = run("bench", "default", "--shape", "4096x4096", "--m", "1,128", "-o", str(out))
    assert r.exit_code == 0, r.output
    res = cmp.load_results(out)
    assert res.label == "default" and res.problems[0].problem == Problem(4096, 4096)
    assert res.problems[0].config == PRESETS["default"]
    assert {m: p.path for m, p in res.problems[0].points.items()} == {1: "fused", 128: "recon"}
    # a file against a source: the source is measured on the file's shapes and Ms
    r = run("compare", str(out), "default")
    assert r.exit_code == 0, r.output
    assert "1.000" in r.output
    # bench of a results file shows it without a GPU; at 80 columns the config is one line,
    # spelled as every table spells it, beside the first M of its band
    r = CliRunner().invoke(main, ["bench", str(out)], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "4096x4096" in r.output
    first = next(ln for ln in r.output.splitlines() if ln.startswith("4096x4096"))
    assert _config_short(PRESETS["default"]) in first, r.output
    # ... and -o writes the (filtered) subset, itself a results file; a filter matching nothing
    # is an error, not an empty table
    sub = tmp_path / "m1.json"
    r = CliRunner().invoke(main, ["bench", str(out), "--m", "1", "-o", str(sub)])
    assert r.exit_code == 0, r.output
    assert {m for m in cmp.load_results(sub).problems[0].points} == {1}
    r = CliRunner().invoke(main, ["bench", str(out), "--shape", "8192x8192"])
    assert r.exit_code == 1 and "no (shape, M) of it matches" in r.stderr


def test_bench_refuses_an_unwritable_output_before_measuring(fake_gpu: list[Any],
                                                             tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    r = run("bench", "default", "--shape", "4096x4096", "--m", "1",
            "-o", str(tmp_path / "a-file" / "out.json"))
    assert r.exit_code == 1 and "error:" in r.output and "not a folder" in r.output, r.output
    assert fake_gpu == []  # nothing was measured


def test_bench_tuned_without_entries_fails_clearly(fake_gpu: list[Any], tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    r = CliRunner().invoke(main, ["bench", "tuned", "--model", "llama-3-8b", "--db", db])
    assert r.exit_code == 1
    assert "no tuned entry" in r.output and "gemmtune tune" in r.output
