#!/usr/bin/env bash
# Every GPU check of the project in one run (`bash scripts/gpu_bench.sh`), for a machine with
# a CUDA GPU.  Results go to $OUT (default results/gpu): log.txt and the benchmarks' CSV/PNG
# files.  Sections run in order of importance, each under its own time limit, so a run cut
# short by the device budget still leaves the first answers; SECTIONS="step grid" runs a
# subset.  Python packages missing there (hydra-core, omegaconf, ...) may be supplied as
# wheels in .whl/.
#
#   step      Figure 2: eight methods, eager and compiled with CUDA graphs (RLD/KD ratio)
#   grid      packed grid (16 RLD points) against the points one after another
#   data      input paths: CIFAR on the device vs DataLoader; ImageNet PIL vs nvjpeg
#   imagenet  training-step images/s of ResNet34 -> ResNet18 (bf16)
#   epoch     one RLD epoch: fast path (eager, compiled) against the published loop
#   cli       real runs through the CLI on CUDA: logit and feature distillers, fp16,
#             compile, a packed grid, torchrun with NCCL on one GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
SECTIONS=${SECTIONS:-"step grid data imagenet epoch cli"}
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
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s since start)"; }

if want step; then
    stamp "bench step: eight methods, eager"
    timeout 240 $PY -m rld.bench step --steps 100 --out "$OUT/step_eager"
    stamp "bench step: compiled, CUDA graphs"
    timeout 420 $PY -m rld.bench step --steps 100 --compile --compile-mode reduce-overhead \
        --methods vanilla,kd,dkd,rld --out "$OUT/step_compiled"
fi
if want grid; then
    stamp "bench grid: 16 packed points (loop and vmap) vs one after another"
    timeout 300 $PY -m rld.bench grid --steps 50 --mode all --out "$OUT/bench_grid.csv"
    timeout 420 $PY -m rld.bench grid --steps 50 --mode all --compile \
        --compile-mode reduce-overhead --out "$OUT/bench_grid_compiled.csv"
fi
if want data; then
    stamp "bench data: CIFAR"
    timeout 120 $PY -m rld.bench data --out "$OUT/bench_data.csv"
    stamp "bench data: ImageNet input paths"
    timeout 300 $PY -m rld.bench data --dataset imagenet --out "$OUT/bench_imagenet_data.csv"
fi
if want imagenet; then
    stamp "bench step: ResNet34 -> ResNet18, batch 256, bf16"
    timeout 240 $PY -m rld.bench step --pair resnet34_resnet18 --steps 30 --warmup 5 \
        --out "$OUT/step_imagenet"
fi
if want epoch; then
    stamp "bench epoch"
    timeout 180 $PY -m rld.bench epoch --out "$OUT/bench_epoch.csv"
    timeout 240 $PY -m rld.bench epoch --compile --compile-mode reduce-overhead \
        --skip-reference --out "$OUT/bench_epoch_compiled.csv"
fi
if want cli; then
    stamp "training on CUDA through the CLI"
    ROOT=$(mktemp -d)
    COMMON=(paths.root="$ROOT" dataset=synthetic pair=tiny trainer.progress=line)
    $PY -m rld.train "${COMMON[@]}" distiller=vanilla role=teacher trainer.epochs=3
    $PY -m rld.train "${COMMON[@]}" distiller=rld trainer.epochs=3
    $PY -m rld.train "${COMMON[@]}" distiller=dkd trainer.epochs=3 trainer.precision=fp16
    $PY -m rld.train -m "${COMMON[@]}" distiller=fitnet,ofd,reviewkd,crd trainer.epochs=2 \
        distiller.nce_k=512
    timeout 150 $PY -m rld.train "${COMMON[@]}" distiller=kd trainer.epochs=2 trainer.compile=true
    stamp "packed grid on CUDA (bf16) against the same points run separately"
    GRID=(distiller=rld distiller.beta=2,8 distiller.tau=2,4 trainer.epochs=2)
    $PY -m rld.train -m "${COMMON[@]}" hydra/launcher=packed "${GRID[@]}" tag=packed
    $PY -m rld.train -m "${COMMON[@]}" "${GRID[@]}" tag=sep
    $PY - "$ROOT/sweeps" <<'PYEOF'
import csv, sys
from pathlib import Path
root = Path(sys.argv[1])
worst_loss = worst_top1 = 0.0
for packed in sorted((root / "packed").rglob("history.csv")):
    sep = root / "sep" / packed.relative_to(root / "packed")
    a, b = (list(csv.DictReader(open(p))) for p in (packed, sep))
    for ra, rb in zip(a, b):
        worst_loss = max(worst_loss, abs(float(ra["loss"]) / float(rb["loss"]) - 1))
        worst_top1 = max(worst_top1, abs(float(ra["test_top1"]) - float(rb["test_top1"])))
print(f"packed vs separate (bf16): loss max rel diff {worst_loss:.2e}, "
      f"top-1 max diff {worst_top1:.2f} points")
PYEOF
    stamp "torchrun, NCCL, one GPU"
    timeout 180 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m rld.train \
        "${COMMON[@]}" distiller=rld trainer.epochs=2 tag=ddp
    for m in $(find "$ROOT/sweeps" -name metrics.json | sort); do
        $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['distiller'], m['precision'], m['device'], m.get('world_size'), m['status'], m['top1'], m['wall_s'])" "$m"
    done
fi
stamp "done"
