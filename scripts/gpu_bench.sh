#!/usr/bin/env bash
# Every GPU check of the project in one run (`bash scripts/gpu_bench.sh`), for a machine with
# a CUDA GPU: the three benchmarks (step, data, epoch; the epoch also compiled) and real
# training runs through the CLI on CUDA (bf16 default, fp16 with its gradient scaler).
# Results go to $OUT (default results/gpu): log.txt and the benchmarks' CSV/PNG files.
# Python packages missing there (hydra-core, omegaconf) may be supplied as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    export PYTHONPATH=$SITE
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== bench step"; $PY -m rld.bench step --out "$OUT"
echo "== bench epoch"; $PY -m rld.bench epoch --out "$OUT/bench_epoch.csv"
echo "== bench data"; $PY -m rld.bench data --out "$OUT/bench_data.csv"

echo "== training on CUDA through the CLI"
ROOT=$(mktemp -d)
COMMON=(paths.root="$ROOT" dataset=synthetic pair=tiny trainer.progress=line)
$PY -m rld.train "${COMMON[@]}" distiller=vanilla role=teacher trainer.epochs=3
$PY -m rld.train "${COMMON[@]}" distiller=rld trainer.epochs=3
$PY -m rld.train "${COMMON[@]}" distiller=dkd trainer.epochs=3 trainer.precision=fp16

echo "== compiled (torch.compile): bench epoch, then a CLI run"
timeout 240 $PY -m rld.bench epoch --compile --skip-reference --out "$OUT/bench_epoch_compiled.csv"
timeout 150 $PY -m rld.train "${COMMON[@]}" distiller=kd trainer.epochs=2 trainer.compile=true
for m in $(find "$ROOT/sweeps" -name metrics.json | sort); do
    $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['distiller'], m['precision'], m['device'], m['status'], m['top1'], m['wall_s'])" "$m"
done
