#!/usr/bin/env python3
"""Per-M ratios (default ÷ tuned) of every entry in a tuning database, as JSON and a table.

    python bench/tuned_report.py --db sqlite:///tuning.db -o tuned.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gemmtune.db.store import Store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("-o", "--output")
    args = ap.parse_args()
    rows = []
    with Store.open(args.db, readonly=True) as store:
        for e in store.list_results():
            ratios = {int(m): e.default_latencies_us[m] / e.latencies_us[m] for m in e.latencies_us}
            rows.append({"problem": e.problem_key, "workload": e.workload_key, "config": e.config,
                         "objective_us": e.objective_us, "default_objective_us": e.default_objective_us,
                         "latencies_us": e.latencies_us, "default_latencies_us": e.default_latencies_us,
                         "default_over_tuned": ratios, "provenance": e.provenance})
            worst = min(ratios.values())
            print(f"{e.problem_key:22s} {e.workload_key:8s} speedup {e.default_objective_us / e.objective_us:5.2f}x"
                  f"  per-M default/tuned min {worst:.3f} "
                  + " ".join(f"M{m}:{r:.2f}" for m, r in sorted(ratios.items())))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
