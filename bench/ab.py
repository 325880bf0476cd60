#!/usr/bin/env python3
"""A/B of kernel revisions in one run: the same named variants timed in two or more source trees,
one after the other on the same card, and one table of the ratios.

Why: a kernel change is judged against the tree before it on the same card in the same device
call (timings from another card or another lease are history). Each tree is installed into a
directory of its own and `bench/variants.py` runs once per tree with that directory first on
`PYTHONPATH`, so every tree compiles and times its own kernels (each with its own kernel hash);
every timed variant is first checked against the reference. This tree's `bench/variants.py`
drives every tree's package, so the trees must share its evaluator API
(`autotune.measure.CudaEvaluator.fused`).

    git archive HEAD~1 | tar -x -C /tmp/old             # the tree to compare with (here, before)
    python bench/ab.py --tree new=. --tree old=/tmp/old --shapes 5120x5120,4096x6144 \\
        --ms 1,8 --keys stream1x8-ch8-sl2-sk0,stream1x16-ch4-sl2-sk0 -o ab.json

The first tree is the one the others are compared with in the table (`old ÷ new` reads as the
speed-up). The JSON keeps every tree's rows, device and kernel hash. A tree that fails to
install, or a variant that fails its check, makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def parse_tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--tree wants NAME=PATH, got {text!r}")
    if not (Path(path) / "pyproject.toml").is_file():
        raise argparse.ArgumentTypeError(f"--tree {name}: {path} holds no pyproject.toml")
    return name, Path(path)


def install(tree: Path, target: Path) -> None:
    """The tree's package alone into `target` (its dependencies are the running environment's)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(tree)], check=True)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: per (shape, M, key), each tree's µs and, for every tree after the first,
    its time over the first tree's."""
    names = list(results)
    base = names[0]
    cells: dict[tuple[int, int, int, str], dict[str, float | None]] = {}
    for name in names:
        for r in results[name]["rows"]:
            cells.setdefault((r["K"], r["N"], r["M"], r["key"]), {})[name] = r.get("us")
    head = ["layer", "M", "key", *(f"{n} (µs)" for n in names), *(f"{n} ÷ {base}" for n in names[1:])]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for (k, n, m, key), got in cells.items():
        us = [got.get(t) for t in names]
        ratios = [f"{u / us[0]:.2f}" if u is not None and us[0] else "—" for u in us[1:]]
        shown = [f"{u:.2f}" if u is not None else "failed" for u in us]
        out.append(f"| {k}×{n} | {m} | `{key}` | " + " | ".join(shown + ratios) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=parse_tree, action="append", required=True,
                    help="NAME=PATH of a source tree (at least two; the first is the reference)")
    ap.add_argument("--shapes", required=True, help="KxN,KxN,...")
    ap.add_argument("--ms", default="1,8", help="M values, comma-separated")
    ap.add_argument("--keys", required=True, help="variant keys, comma-separated")
    ap.add_argument("-o", "--output", help="JSON file for every tree's rows")
    args = ap.parse_args(argv)
    names = [n for n, _ in args.tree]
    if len(args.tree) < 2 or len(set(names)) != len(names):
        ap.error("give at least two --tree NAME=PATH with different names")
    import torch

    if not torch.cuda.is_available():
        print("bench/ab.py times kernels: it needs a CUDA GPU, and this machine has none", file=sys.stderr)
        return 1
    results: dict[str, dict[str, Any]] = {}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="gemmtune-ab-") as tmp:
        for name, tree in args.tree:
            site = Path(tmp) / name
            try:
                install(tree, site)
            except subprocess.CalledProcessError as exc:
                print(f"{name}: could not install {tree} ({exc})", file=sys.stderr)
                return 1
            out = Path(tmp) / f"{name}.json"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
            print(f"== {name} ({tree})", flush=True)
            rc = subprocess.run([sys.executable, str(HERE / "variants.py"), "--shapes", args.shapes,
                                 "--ms", args.ms, "--keys", args.keys, "-o", str(out)], env=env).returncode
            bad += rc != 0
            if not out.is_file():
                print(f"{name}: bench/variants.py wrote no results (exit {rc})", file=sys.stderr)
                return 1
            results[name] = {"tree": str(tree), **json.loads(out.read_text())}
    print("\n".join(table(results)))
    if args.output:
        Path(args.output).write_text(json.dumps({"what": "bench/ab.py", "command": " ".join(sys.argv),
                                                 "trees": results}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
