#!/usr/bin/env bash
# Issue #25 on a GPU: does pretraining of the length a GPU affords make two annotated slices enough? As ONE call of
# the device tool, after benchmarks/gpu_kit.sh here (it packs ISBI, EPFL and NASA):
#   command: bash benchmarks/gpu_pretrain.sh     carry: [".gpu"]     timeout_s: 600
# It takes most of a session's 15 device-minutes, as gpu_check.sh and gpu_transfer.sh (#24) do: a session runs one.
# On the CPU the contrastive objective met the goal on EPFL alone and self-training came closest on ISBI
# (docs/training.md, "Where this stands"); what two cores could not try is pretraining many times longer. Needs no
# .git. Options:
#   --budget S    seconds after which no run is started and running ones are stopped (default 470);
#                 what finished is reported, seed 0 of everything first
#   --minutes M   pretraining minutes of each data set (default 3; the three run side by side)
#   --batch B     crops a pretraining step (default 8, as on the CPU, where 32 in the same 20 minutes did worse:
#                 docs/training.md, "Twelfth attempt"; on a GPU a step of 32 may cost little more than one of 8)
#   --jobs N      runs side by side on the one GPU (default 8)
#   --data DIR    a folder holding isbi2012/, epfl_mito/, nasa_super/ (default .gpu/data)
#   --rehearse    on the CPU with tiny runs of seed 0, to check the script end to end on a machine without a GPU
# Steps (bench_pretrain.py; 600 steps on ISBI, 300 on EPFL and NASA, the budgets of the CPU tables):
#   1. side by side: contrastive pretraining on each data set's unlabelled images (M minutes, batch B) and, in the
#      other slots, the arms that need no pretrained model: random weights and self-training (seeds 0-2), and the
#      ceiling, all training slices (seed 0)
#   2. from each pretrained model: the pretrained arm and self-training from it (seeds 0-2)
#   3. $OUT/summary.txt: the pretraining reports and each data set's arms side by side (`bench_pretrain.py arms`; the
#      picture in $OUT/pretrain_arms.png); $OUT/gpu_pretrain.tar.gz: every JSON, log and picture
set -uo pipefail
cd "$(dirname "$0")/.."
data=.gpu/data; budget=470; jobs=8; rehearse=; minutes=3; batch=8; seeds="0 1 2"; device=auto
declare -A steps=([membranes]=600 [mito]=300 [materials]=300)
while [ $# -gt 0 ]; do
    case $1 in
        --budget) budget=$2; shift 2 ;;
        --minutes) minutes=$2; shift 2 ;;
        --batch) batch=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --data) data=$2; shift 2 ;;
        --rehearse) rehearse=1; jobs=2; budget=1500; minutes=0.05; batch=4; seeds=0; device=cpu
                    steps=([membranes]=2 [mito]=2 [materials]=2); shift ;;
        *) echo "gpu_pretrain: unknown option $1 (--budget S, --minutes M, --batch B, --jobs N, --data DIR, --rehearse)"
           exit 2 ;;
    esac
done
name=gpu_pretrain
source benchmarks/gpu_env.sh

PRE="$PY benchmarks/bench_pretrain.py"
sets="membranes mito materials"
model_of() { compgen -G "$work/runs/pretrain/${1}_*min_contrastive_b${batch}/model.safetensors" | head -1; }
arm() {  # arm SET ARM TAG SEED [OPTIONS]: a line of the queue
    local set=$1 arm=$2 tag=$3 seed=$4; shift 4
    q "${set}_${tag}_s$seed $PRE finetune $set --steps ${steps[$set]} --arms $arm --seeds $seed --tag ${tag}_s$seed --device $device $*"
}

# -- 1. pretraining (3 slots) beside the arms that need no pretrained model (the other slots)
queue=$work/pretrain; : > "$queue"
for set in $sets; do
    q "pretrain_$set $PRE pretrain $set --minutes $minutes --objective contrastive --batch-size $batch --device $device"
done
queue=$work/independent; : > "$queue"
for seed in $seeds; do
    for set in $sets; do
        arm "$set" random gpu_random "$seed"
        arm "$set" selftrain gpu_selftrain "$seed"
    done
    if [ "$seed" = 0 ]; then for set in $sets; do arm "$set" full gpu_full 0; done; fi
done
say "== 1. contrastive pretraining, $minutes min, batch $batch, beside $(wc -l < "$queue") runs; until $(date -d @"$deadline" +%T 2>/dev/null || echo the deadline)"
three=$((jobs < 3 ? jobs : 3))  # slots for pretraining, then for the runs from its models
xargs -P "$three" -L 1 bash -c 'run_one "$@"' _ < "$work/pretrain" | tee -a "$summary" &
pretraining=$!
xargs -P "$((jobs > three ? jobs - three : 1))" -L 1 bash -c 'run_one "$@"' _ < "$work/independent" > "$work/independent.out" &
wait "$pretraining"
# -- 2. from the pretrained models, in the slots pretraining held (the other queue goes on beside them)
queue=$work/pretrained; : > "$queue"
for seed in $seeds; do
    for set in $sets; do
        [ -n "$(model_of "$set")" ] || continue
        arm "$set" pretrained gpu_con "$seed" --pretrained "$(model_of "$set")"
        arm "$set" selftrain gpu_stcon "$seed" --pretrained "$(model_of "$set")"
    done
done
say "== 2. $(wc -l < "$queue") runs from the pretrained models"
xargs -P "$three" -L 1 bash -c 'run_one "$@"' _ < "$queue" >> "$work/pretrained.out"
wait
cat "$work/independent.out" "$work/pretrained.out" | tee -a "$summary"

# -- 3. tables and the archive
say "== 3. results after $(($(date +%s) - start)) s"
for p in "$work"/runs/pretrain/pretrain_*.json; do [ -f "$p" ] && say "$(basename "$p"): $(tr -s ' \n' ' ' < "$p")"; done
have() { compgen -G "$work/runs/pretrain/finetune_$1_$2_s[0-9]*.json" > /dev/null; }  # have SET TAG: results
panels=()
for set in $sets; do
    have "$set" gpu_random || continue  # the reference of the panel
    panels+=(--panel "$set" "random weights=gpu_random")
    for arm in "contrastive start=gpu_con" "self-training=gpu_selftrain" "contrastive, then self-training=gpu_stcon" \
               "all slices (ceiling)=gpu_full"; do
        have "$set" "${arm##*=}" && panels+=("$arm")
    done
done
if [ ${#panels[@]} -gt 0 ]; then
    $PRE arms "${panels[@]}" --plot "$OUT/pretrain_arms.png" 2>&1 | tee -a "$summary"
else
    say "no arm finished"
fi
find "$work/runs" -name '*.json' -o -name '*.png' | sed "s|^$work/||" > "$work/files"
tar czf "$OUT/gpu_pretrain.tar.gz" -C "$work" logs -T "$work/files" \
    && say "archive: gpu_pretrain.tar.gz ($(du -h "$OUT/gpu_pretrain.tar.gz" | cut -f1))"
