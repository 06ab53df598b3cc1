#!/usr/bin/env bash
# What nqpq finds on Gemma 3 270M (Q4_K_M GGUF from the package registry: BOS-trained, 18 layers, Hq 4, Hkv 1,
# D 256, a 512-token window on 5 of every 6 layers, vocabulary 262,144), on CPU.
#
#   bash benchmarks/gemma3.sh [OUT]        # default OUT: benchmarks/results/gemma3-270m
#
# Runs, each into OUT/<name>/ (results.json, plots, report.txt, and its wall time in OUT/times.tsv):
#   sinks-N-heldout  the sweep: default layers (the last quarter, 14-17), held-out basis (the default) with 95 %
#                    intervals, --sink-tokens 0 1 (the sink, BOS here, kept apart or not), d_r $D_R
#   sweep-S-heldout  the same sweep without the sink setting on S blocks (narrower intervals for the headline)
#   scan-M           nqpq scan of all 18 layers, each alone, d_r $SCAN_D_R
# The text is WikiText-103 validation as shipped with nqpq (--text); the model is fetched once by name.
# Sizes (environment): N_BLOCKS (default 8), SWEEP_BLOCKS (16), D_R ("8 32"), SCAN_BLOCKS (2), SCAN_D_R (32).
# The committed runs use the defaults: Gemma's 262,144-token LM head makes every pass about twice SmolLM2's, and
# they were made on 2 CPU cores shared with other jobs. The spec's size, for a quiet machine or a GPU:
#   N_BLOCKS=30 SWEEP_BLOCKS=30 D_R="1 2 4 8 16 32" SCAN_BLOCKS=8 SCAN_D_R="8 32" bash benchmarks/gemma3.sh runs/g3
# Every run is `nqpq` itself; nothing else computes a number.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gemma3-270m}
N_BLOCKS=${N_BLOCKS:-8}
SWEEP_BLOCKS=${SWEEP_BLOCKS:-16}
D_R=${D_R:-8 32}
SCAN_BLOCKS=${SCAN_BLOCKS:-2}
SCAN_D_R=${SCAN_D_R:-32}
mkdir -p "$OUT"
python3 -m nqpq fetch gemma3-270m
: > "$OUT/times.tsv.part"
run() {  # run NAME nqpq-args...: one nqpq call into OUT/NAME, its report in report.txt, its wall time in times.tsv
    local name=$1
    shift
    rm -rf "${OUT:?}/$name"
    local t0=$SECONDS
    python3 -m nqpq "$@" --model gemma3-270m --device cpu --no-progress --out "$OUT/$name" | tee "$OUT/$name.report.txt"
    mv "$OUT/$name.report.txt" "$OUT/$name/report.txt"
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "nqpq $* --model gemma3-270m" >> "$OUT/times.tsv.part"
}
# shellcheck disable=SC2086  # D_R and SCAN_D_R are lists of ranks
run "sinks-$N_BLOCKS-heldout" sweep --text wikitext-103-valid --n-blocks "$N_BLOCKS" --d-r $D_R --sink-tokens 0 1
# shellcheck disable=SC2086
run "sweep-$SWEEP_BLOCKS-heldout" sweep --text wikitext-103-valid --n-blocks "$SWEEP_BLOCKS" --d-r $D_R
# shellcheck disable=SC2086
run "scan-$SCAN_BLOCKS" scan --text wikitext-103-valid --n-blocks "$SCAN_BLOCKS" --d-r $SCAN_D_R
mv "$OUT/times.tsv.part" "$OUT/times.tsv"
python3 -m benchmarks.models_table "$OUT/sweep-$SWEEP_BLOCKS-heldout" "$OUT/sinks-$N_BLOCKS-heldout" --scan "$OUT/scan-$SCAN_BLOCKS"
