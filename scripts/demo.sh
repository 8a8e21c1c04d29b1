#!/usr/bin/env bash
# The offline demo (`make demo`): on scikit-learn's digits, on the CPU, in a few minutes,
# train the `tiny` pair's teacher, the student alone, KD and a 2x2 RLD grid, then the table.
# Runs land in sweeps/demo/; running the demo again recalls finished runs instantly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
COMMON=(dataset=digits pair=tiny tag=demo trainer.device=cpu trainer.progress=line)

step() { printf '\n== %s\n' "$*"; }

step "1/5 teacher (resnet14) on digits"
$PY -m rld.train "${COMMON[@]}" distiller=vanilla role=teacher
step "2/5 student (resnet8) alone"
$PY -m rld.train "${COMMON[@]}" distiller=vanilla
step "3/5 KD"
$PY -m rld.train "${COMMON[@]}" distiller=kd
step "4/5 RLD grid: beta in {2,8} x tau in {2,4}"
$PY -m rld.train -m "${COMMON[@]}" distiller=rld distiller.beta=2,8 distiller.tau=2,4 \
    distiller.warmup=2
step "5/5 the table"
$PY -m rld.table sweeps/demo --out results/demo
echo
echo "runs:    sweeps/demo/digits/tiny/"
echo "table:   results/demo/digits.md"
echo "heatmap: results/demo/digits/tiny_rld_grid.png"
