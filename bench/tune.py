#!/usr/bin/env python3
"""Measure the tuner itself (issue 4's targets) on a GPU; writes JSON for BENCHMARKS.md.

1. search efficiency: on each shape, the grid sampler runs the whole `standard` space (the exact
   optimum of the space); then tpe, random and gp run on the *same* evaluator, whose memoised
   measurements make every sampler see the identical landscape. Reported: trials each needs to
   come within 3 % of the grid optimum.
2. run-to-run: the same problem tuned twice from scratch (fresh evaluator, fresh study); the two
   winners are re-measured interleaved against each other.

    python bench/tune.py -o out/tune.json --shapes 4096x4096,14336x4096 --workload decode
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import optuna
from gemmtune.autotune import study as st
from gemmtune.autotune.measure import CudaEvaluator
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.sources import kernel_hash
from gemmtune.kernels.workload import Workload


def values_in_order(storage: optuna.storages.BaseStorage, name: str) -> list[float]:
    s = optuna.load_study(study_name=name, storage=storage)
    trials = sorted(s.get_trials(deepcopy=False), key=lambda t: t.number)
    return [t.value if t.value is not None else float("inf") for t in trials
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]


def trials_to_within(values: list[float], target: float) -> int | None:
    best = float("inf")
    for i, v in enumerate(values, 1):
        best = min(best, v)
        if best <= target:
            return i
    return None


def efficiency(problem: Problem, workload: Workload, samplers: list[str], budget: int, seed: int,
               log) -> dict:
    ev = CudaEvaluator(problem, workload)
    t0 = time.time()
    grid_storage = optuna.storages.InMemoryStorage()
    grid = st.tune_problem(ev, grid_storage, st.TuneSettings(sampler="grid"))
    grid_s = time.time() - t0
    gvals = values_in_order(grid_storage, grid.study_name)
    opt = min(gvals)
    log(f"{problem.key()}: grid {len(gvals)} trials in {grid_s:.0f} s, optimum {opt:.2f} µs "
        f"({grid.best_config.key() if grid.best_config else None}), default {grid.default_objective_us}")
    out = {"problem": problem.key(), "grid_trials": len(gvals), "grid_seconds": round(grid_s, 1),
           "grid_optimum_us": round(opt, 3), "grid_best": grid.best_config.key() if grid.best_config else None,
           "default_objective_us": grid.default_objective_us, "samplers": {}}
    for sampler in samplers:
        runs = []
        for rep in range(1 if sampler == "gp" else 3):
            storage = optuna.storages.InMemoryStorage()
            o = st.tune_problem(ev, storage, st.TuneSettings(sampler=sampler, trials=budget,
                                                             seed=seed + rep, interleave_rounds=3))
            vals = values_in_order(storage, o.study_name)
            runs.append({"trials_to_3pct": trials_to_within(vals, opt * 1.03),
                         "best_after_budget_us": round(min(vals), 3)})
        out["samplers"][sampler] = runs
        log(f"  {sampler}: trials to within 3 % of the grid optimum: "
            f"{[r['trials_to_3pct'] for r in runs]} (budget {budget}, grid {len(gvals)})")
    return out


def run_to_run(problem: Problem, workload: Workload, trials: int, log) -> dict:
    picks = []
    for rep in range(2):
        ev = CudaEvaluator(problem, workload, seed=100 + rep)
        # one config per run (max_bands=1): the two winners are compared as configs below
        o = st.tune_problem(ev, optuna.storages.InMemoryStorage(),
                            st.TuneSettings(sampler="tpe", trials=trials, seed=1000 + rep,
                                            max_bands=1))
        picks.append(o.best_config)
    ev = CudaEvaluator(problem, workload, seed=7)
    a, b = ev.interleaved(picks[0], picks[1], rounds=7)
    oa = workload.objective({m: x.median_us for m, x in a.items()})
    ob = workload.objective({m: x.median_us for m, x in b.items()})
    diff = abs(oa - ob) / min(oa, ob)
    log(f"{problem.key()} run-to-run: {picks[0].key()} {oa:.2f} µs vs {picks[1].key()} {ob:.2f} µs "
        f"-> {diff * 100:.2f} %")
    return {"problem": problem.key(), "trials": trials, "first": picks[0].key(), "second": picks[1].key(),
            "first_us": round(oa, 3), "second_us": round(ob, 3), "difference_pct": round(diff * 100, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,14336x4096")
    ap.add_argument("--workload", default="decode")
    ap.add_argument("--samplers", default="tpe,random,gp")
    ap.add_argument("--budget", type=int, default=108, help="trials per sampler run (30 %% of 360)")
    ap.add_argument("--r2r-trials", type=int, default=60)
    ap.add_argument("-o", "--output", default="bench-tune.json")
    args = ap.parse_args()
    wl = Workload.parse(args.workload)
    shapes = [Problem(*map(int, s.split("x"))) for s in args.shapes.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731
    res = {"date": dt.date.today().isoformat(), "kernel_hash": kernel_hash(),
           "command": "python bench/tune.py " + " ".join(sys.argv[1:]), "workload": wl.key(),
           "efficiency": [], "run_to_run": []}
    from gemmtune.kernels.device import query_device

    res["device"] = query_device().to_dict()
    for p in shapes:
        res["efficiency"].append(efficiency(p, wl, args.samplers.split(","), args.budget, 1, log))
    if args.r2r_trials:
        res["run_to_run"].append(run_to_run(shapes[0], wl, args.r2r_trials, log))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
