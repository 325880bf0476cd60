#!/usr/bin/env bash
# The two `gemmtune compare` runs BENCHMARKS.md shows, on the GPU machine (issue 6):
#
#   70b    exllamav2-0.0.11 vs exllamav2-0.0.12 on every Llama-2-70B layer shape: the regression
#          the 0.0.12 constants (fused <= 32 rows, 4 rows per block) shipped
#   8b     tune llama-3-8b (mixed workload) into a throw-away database, then
#          exllamav2-0.0.12 vs tuned on its shapes
#
# Both use the fused layout (qkv, o, gate_up, down), as when docs/compare-* were first measured
# (before --layout existed), so reruns stay comparable with them.
#
# Writes docs/compare-*.json (comparison incl. both results), docs/compare-*.md (table),
# docs/compare-*.png (latency against M with each config's fused/reconstruct switch) and the
# tuned profile docs/compare-tuned-llama-3-8b.profile.json. When $OUT is set (the device runner)
# the same files and the console logs are copied under $OUT so they come back.
#
# usage: bash bench/show_compare.sh [70b|8b|all]      (default all)
# env:   GEMMTUNE  the CLI (default: gemmtune on PATH, else /tmp/site/bin/gemmtune)
#        TRIALS    tune trials per shape (default 40); TUNE_TIMEOUT seconds per shape (default 60)
#        ROUNDS    A B rounds per (shape, M) (default 15)
# `compare` exits 1 when it flags a regression: expected for 70b, so it does not stop the script.
set -uo pipefail

what="${1:-all}"
GEMMTUNE="${GEMMTUNE:-$(command -v gemmtune || echo /tmp/site/bin/gemmtune)}"
TRIALS="${TRIALS:-40}"
TUNE_TIMEOUT="${TUNE_TIMEOUT:-60}"
ROUNDS="${ROUNDS:-15}"
export COLUMNS="${COLUMNS:-120}"  # rich tables at a readable width in logs
mkdir -p docs
logs="${OUT:-docs}"
written=()

python -c "import matplotlib" 2>/dev/null || { echo "matplotlib is missing: pip install matplotlib" >&2; exit 2; }

run_compare() {  # name, then compare arguments
    local name="$1"; shift
    local base="docs/compare-$name"
    echo "== gemmtune compare $* (-> $base.*)"
    "$GEMMTUNE" compare "$@" --rounds "$ROUNDS" --json "$base.json" --report "$base.md" \
        --plot "$base.png" 2>&1 | tee "$logs/compare-$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== exit status $rc (0: no regression, 1: regression flagged or error)"
    written+=("$base.json" "$base.md" "$base.png")
}

if [[ "$what" == 70b || "$what" == all ]]; then
    run_compare exllamav2-0.0.11-vs-0.0.12-llama-2-70b exllamav2-0.0.11 exllamav2-0.0.12 \
        --model llama-2-70b --layout fused
fi

if [[ "$what" == 8b || "$what" == all ]]; then
    tmpdb="$(mktemp -d)/tuning.db"
    echo "== gemmtune tune --model llama-3-8b --layout fused --workload mixed --db $tmpdb"
    "$GEMMTUNE" tune --model llama-3-8b --layout fused --workload mixed --db "$tmpdb" --trials "$TRIALS" \
        --timeout "$TUNE_TIMEOUT" 2>&1 | tee "$logs/tune-llama-3-8b.txt"
    tune_rc=${PIPESTATUS[0]}
    if [[ $tune_rc -ne 0 ]]; then
        echo "== tune exited $tune_rc; comparing whatever was stored" >&2
    fi
    "$GEMMTUNE" export --db "$tmpdb" -o docs/compare-tuned-llama-3-8b.profile.json \
        && written+=(docs/compare-tuned-llama-3-8b.profile.json)
    GEMMTUNE_DB="$tmpdb" run_compare exllamav2-0.0.12-vs-tuned-llama-3-8b exllamav2-0.0.12 tuned \
        --model llama-3-8b --layout fused --db "$tmpdb"
fi

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/docs"
    for f in "${written[@]}"; do [[ -f "$f" ]] && cp "$f" "$OUT/docs/"; done
fi
echo "== summary"
for f in docs/compare-*.md; do
    [[ -f "$f" ]] && { echo "-- $f"; grep -E '^\| \*\*all\*\*|regressions? and' "$f"; }
done
