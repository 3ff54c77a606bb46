#!/usr/bin/env bash
# Run THERE, on a lent GPU machine, after benchmarks/gpu_kit.sh here; one call of the device tool:
#   command: bash benchmarks/gpu_check.sh     carry: [".gpu"]     timeout_s: 600
# The issue's GPU check (docs/training.md, "Against the targets"): the ISBI 2012 benchmark with emseg's
# defaults (`bench_train_real.py isbi`, slices 0-23 / 24-29), then a full-width VGG-16-BN U-Net given more
# steps, each in a fixed time; then the inference benchmark on CUDA (docs/performance.md, "GPU: pending").
# Reports, logs and loss curves come back in $OUT (at most 8 files). About 9 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || { echo "gpu_check: installing .gpu/whl failed (run benchmarks/gpu_kit.sh here and carry .gpu)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
export EMSEG_BENCH_DATA=$PWD/.gpu/data EMSEG_BENCH_RUNS=/tmp/gpu_runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1

run() {  # run TAG TIMEOUT_SECONDS ARGS...: one benchmark, its report, log and curves into $OUT
    local tag=$1 cap=$2; shift 2
    timeout "$cap" "$PY" benchmarks/bench_train_real.py isbi --tta --tag "$tag" "$@" > "$OUT/$tag.log" 2>&1
    echo "$tag: exit $?"
    cp "/tmp/gpu_runs/$tag.json" "$OUT/" 2>/dev/null
    cp "/tmp/gpu_runs/$tag/curves.png" "$OUT/$tag-curves.png" 2>/dev/null
    "$PY" - "/tmp/gpu_runs/$tag.json" <<'PYEOF' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
line = lambda m: f"pixel error {m['pixel_error']:.4f}, membrane IoU {m['iou']['membrane']:.3f}, Rand {m['adapted_rand_error']:.3f}"
print(f"  {r['encoder']}: {r['steps']} steps in {r['train_seconds']} s; {line(r['metrics'])}; TTA {line(r['metrics_tta'])}")
PYEOF
}
# emseg's defaults (at most 2000 steps), given up to 2.5 minutes
run gpu_defaults 200 --minutes 2.5
# a full-width VGG-16-BN U-Net, up to 8000 steps in 3 minutes
run gpu_vgg16 240 --minutes 3 --set encoder=vgg16_bn --set steps=8000
# inference: emseg against MONAI and the bare forward pass, automatic batch size (whatever time is left)
timeout 100 "$PY" benchmarks/bench_inference.py --device cuda --batch-size auto --size 4480 \
    --json "$OUT/inference.json" > "$OUT/inference.log" 2>&1
echo "inference: exit $?"; tail -15 "$OUT/inference.log"
