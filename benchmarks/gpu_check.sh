#!/usr/bin/env bash
# The GPU check of docs/performance.md ("GPU") and docs/training.md, as ONE call of the device tool, after
# benchmarks/gpu_kit.sh here:
#   command: bash benchmarks/gpu_check.sh     carry: [".gpu"]     timeout_s: 600
# Needs no .git (a plain copy of the repository runs it). Options:
#   --data DIR   a folder holding isbi2012/ (default .gpu/data, as gpu_kit.sh makes it)
#   --long       train ISBI for 5 minutes instead of 2 (the call then takes about 11 minutes: give it
#                its own call; the 10-minute figure needs a longer call than the device tool allows)
#   --rehearse   on the CPU with tiny sizes, to check the script end to end on a machine without a GPU
# Steps, about 7.5 minutes on an H200:
#   1. bench_inference --null-network: the pipeline's ceiling on CUDA (16 pages of 4480², near-free network)
#   2. bench_inference: emseg vs MONAI vs the bare forward pass, VGG16-BN and the default encoder,
#      16 pages of 4480² uint16, automatic batch size, start-up apart; GPU vs CPU probabilities
#   3. bench_train_speed: emseg's training loop vs the same network's bare step (300 steps)
#   4. bench_train_real isbi: the defaults, fitted into 2 minutes (5 with --long), ISBI 24-29 with TTA
#   5. emseg pretrain for 30 s on ISBI's training images (unlabelled): its CUDA path (bf16, loss scaling), steps/s
# Everything lands in $OUT/gpu_check.tar.gz (reports, logs, JSON, curves) and $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
data=.gpu/data; minutes=2; device=cuda; pages=16; size=4480; rehearse=; slow=1; pretrain_min=0.5
while [ $# -gt 0 ]; do
    case $1 in
        --data) data=$2; shift 2 ;;
        --long) minutes=5; shift ;;
        --rehearse) rehearse=1; device=cpu; pages=2; size=448; minutes=0.3; slow=4; pretrain_min=0.1; shift ;;
        *) echo "gpu_check: unknown option $1 (--data DIR, --long, --rehearse)"; exit 2 ;;
    esac
done
OUT=${OUT:-/tmp/gpu_check_out}
work=/tmp/gpu_check; rm -rf "$work"; mkdir -p "$OUT" "$work"
name=gpu_check
source benchmarks/gpu_env.sh

step() {  # step NAME TIMEOUT_SECONDS COMMAND...: one benchmark, its output in $work/NAME.log
    local name=$1 cap=$(($2 * slow)); shift 2
    local t0=$SECONDS
    timeout "$cap" "$@" > "$work/$name.log" 2>&1
    say "== $name: exit $? in $((SECONDS - t0)) s"
    grep -E "pipeline ceiling|lower bound:|emseg / synthetic|\| (emseg|MONAI|lower bound|synthetic|emseg train)|GPU against CPU|forward / matmul|^\| U-Net .*x \||pixel error" \
        "$work/$name.log" | tee -a "$summary"
}
step null 90 "$PY" benchmarks/bench_inference.py --null-network --device "$device" --pages "$pages" --size "$size" \
    --json "$work/null.json"
step inference 240 "$PY" benchmarks/bench_inference.py --device "$device" --batch-size auto --pages "$pages" \
    --size "$size" --encoders vgg16_bn vgg11_bn_slim --json "$work/inference.json"
step train_speed 90 "$PY" benchmarks/bench_train_speed.py --device "$device" $([ -n "$rehearse" ] && echo --steps 3) \
    --json "$work/train_speed.json"
step isbi 200 "$PY" benchmarks/bench_train_real.py isbi --tta --minutes "$minutes" --tag "gpu_isbi_${minutes}min" \
    --set device="$device"
"$PY" - "$work/runs/gpu_isbi_${minutes}min.json" <<'PYEOF' 2>&1 | tee -a "$summary"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("isbi: no report")
line = lambda m: f"pixel error {m['pixel_error']:.4f}, membrane IoU {m['iou']['membrane']:.3f}, Rand {m['adapted_rand_error']:.3f}"
print(f"isbi {r['minutes']} min: {r['steps']} steps in {r['train_seconds']} s; {line(r['metrics'])}; TTA {line(r['metrics_tta'])}")
PYEOF
step pretrain 90 "$PY" -m emseg.cli pretrain --images "$data/isbi2012/train-volume.tif" --pixel-size 4 \
    --time-limit "$pretrain_min" --device "$device" -o "$work/runs/pretrain"
"$PY" - "$work/runs/pretrain/model.safetensors" <<'PYEOF' 2>&1 | tee -a "$summary"
import sys
from emseg.model.modelfile import load_card
try:
    p = load_card(sys.argv[1]).pretrained
except Exception as exc:
    sys.exit(f"pretrain: no model ({exc})")
print(f"pretrain: {p['steps']} steps in {p['seconds']} s; validation loss {p['validation_loss']} (copying the input: {p['copy_loss']})")
PYEOF
cp "$work/runs/pretrain/restorations.png" "$work/pretrain-restorations.png" 2>/dev/null
cp "$work/runs/"*.json "$work/" 2>/dev/null
for d in "$work/runs/"*/; do [ -f "$d/curves.png" ] && cp "$d/curves.png" "$work/$(basename "$d")-curves.png"; done
tar czf "$OUT/gpu_check.tar.gz" -C "$work" --exclude runs . && say "archive: gpu_check.tar.gz ($(du -h "$OUT/gpu_check.tar.gz" | cut -f1))"
