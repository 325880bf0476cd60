"""bench/ab.py on the CPU: trees are named and checked before anything is installed, and the
table puts each tree's time of the same (shape, M, key) side by side with its ratio to the first
tree's, failed variants shown as such."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ab", BENCH / "ab.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_tree_is_name_equals_a_source_tree(ab: ModuleType, tmp_path: Path) -> None:
    assert ab.parse_tree(f"new={BENCH.parent}") == ("new", BENCH.parent)
    for bad in ("new", "=.", f"new={tmp_path}"):  # no name, no path, no pyproject.toml there
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_tree(bad)


def test_fewer_than_two_trees_or_a_repeated_name_is_refused(ab: ModuleType) -> None:
    root = str(BENCH.parent)
    for trees in ([f"a={root}"], [f"a={root}", f"a={root}"]):
        args = [x for t in trees for x in ("--tree", t)] + ["--shapes", "64x64", "--keys", "k"]
        with pytest.raises(SystemExit) as exc:
            ab.main(args)
        assert exc.value.code == 2


def test_table_compares_every_tree_with_the_first(ab: ModuleType) -> None:
    def row(m: int, key: str, us: float | None) -> dict[str, object]:
        r: dict[str, object] = {"K": 4096, "N": 1024, "M": m, "key": key}
        if us is None:
            r["failed"] = "off by 1e-1"
        else:
            r["us"] = us
        return r

    results = {"new": {"rows": [row(1, "a", 5.0), row(8, "a", 6.0)]},
               "old": {"rows": [row(1, "a", 5.5), row(8, "a", None)]},
               "older": {"rows": [row(1, "a", 10.0), row(8, "a", 3.0)]}}
    lines = ab.table(results)
    assert lines[0] == "| layer | M | key | new (µs) | old (µs) | older (µs) | old ÷ new | older ÷ new |"
    assert lines[2] == "| 4096×1024 | 1 | `a` | 5.00 | 5.50 | 10.00 | 1.10 | 2.00 |"
    assert lines[3] == "| 4096×1024 | 8 | `a` | 6.00 | failed | 3.00 | — | 0.50 |"
    assert len(lines) == 4


def test_no_gpu_is_one_line_before_anything_is_installed(ab: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ab, "install", lambda *a: pytest.fail("installed a tree without a GPU"))
    root = str(BENCH.parent)
    assert ab.main(["--tree", f"a={root}", "--tree", f"b={root}", "--shapes", "64x64", "--keys", "k"]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
