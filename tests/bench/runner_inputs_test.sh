#!/bin/sh
# validate_published on rows the published file does not hold: the H100/FP8/Llama row is
# predicted, the three it cannot model (a cp not dividing the GPUs among them) are listed with
# their reasons, and it exits 0.
set -eu
out=$("$1" "$2")
printf '%s\n' "$out"
printf '%s\n' "$out" | grep -q '^fixture-llama2-7b-h100-fp8 '
printf '%s\n' "$out" | grep -q '^3 run(s) not predicted:'
printf '%s\n' "$out" | grep -q "row 'fixture-context-parallel'): field '/parallel/cp'"
