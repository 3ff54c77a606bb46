#!/usr/bin/env bash
# Issue #24 on a GPU: the fine-tuning table (goal 3, five seeds at finetune's 500 steps) and goal 4's three data
# sets (two seeds), as ONE call of the device tool, after benchmarks/gpu_kit.sh here (it packs ISBI, EPFL and NASA):
#   command: bash benchmarks/gpu_transfer.sh     carry: [".gpu"]     timeout_s: 600
# It takes most of a session's 15 device-minutes, as gpu_check.sh and gpu_pretrain.sh (#25) do: a session runs one.
# Needs no .git. Options:
#   --budget S    seconds after which no run is started and running ones are stopped (default 470);
#                 what finished is reported, in this order of priority: seed 0 of everything, then seed 1, ...
#   --jobs N      runs side by side on the one GPU (default 8; each holds a CPU core and 1-3 GB of GPU memory)
#   --data DIR    a folder holding isbi2012/, epfl_mito/, nasa_super/ (default .gpu/data)
#   --rehearse    on the CPU with tiny runs of the shift pair, to check the script end to end on a machine
#                 without a GPU (a few minutes on 2 cores)
# Steps:
#   1. side by side: the base models (bench_finetune.py base isbi, epfl, nasa with seeds 0 and 1, isbi-late seed 0;
#      BASE_MIN minutes each: goal 4's GPU row and the bases of the pairs)
#   2. a queue of runs, N at a time: every pair's zero-shot, then for seed 0..4 every pair's training from scratch
#      and fine-tuning, dense and with scribbles (500 steps; odd seeds of the new-task pairs from the bases of
#      seed 1), then every new-task pair's dense fine-tuning from the base's encoder layers at its three finest
#      strides only (encoder_keep_levels 3) for seed 0..4
#   3. $OUT/summary.txt: bench_finetune.py's table, fine-tuned against from scratch seed by seed (`compare`; the
#      picture in $OUT/finetune_vs_scratch.png); $OUT/gpu_transfer.tar.gz: every JSON and log
set -uo pipefail
cd "$(dirname "$0")/.."
data=.gpu/data; budget=470; jobs=8; rehearse=
base_min=1; ft_steps=500; seeds="0 1 2 3 4"
pairs="isbi-epfl epfl-isbi isbi-nasa shift"; bases="isbi:0 epfl:0 nasa:0 isbi-late:0 isbi:1 epfl:1 nasa:1"
while [ $# -gt 0 ]; do
    case $1 in
        --budget) budget=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --data) data=$2; shift 2 ;;
        --rehearse) rehearse=1; jobs=2; budget=1500; base_min=0.03; ft_steps=2; seeds=0; pairs=shift
                    bases=isbi-late:0; shift ;;
        *) echo "gpu_transfer: unknown option $1 (--budget S, --jobs N, --data DIR, --rehearse)"; exit 2 ;;
    esac
done
name=gpu_transfer
source benchmarks/gpu_env.sh

FT="$PY benchmarks/bench_finetune.py"
queue=$work/queue; : > "$queue"
# the base a new-task pair's seed fine-tunes from: odd seeds the base of seed 1 (the eighth look of docs/training.md
# found that the base, not only the fine-tuning's seed, decides whether a pair pays); the shift pairs have one base
base_of() { [ "$1" != shift ] && [ $(($2 % 2)) = 1 ] && echo "--base-tag ${1%%-*}_s1"; }

# -- 1. the bases, side by side
for b in $bases; do
    q "base_${b%:*}_s${b#*:} $FT base ${b%:*} --seed ${b#*:} --minutes $base_min"
done
say "== 1. bases ($(wc -l < "$queue") runs side by side)"
xargs -P "$jobs" -L 1 bash -c 'run_one "$@"' _ < "$queue" | tee -a "$summary"

# -- 2. the queue of fine-tuning runs, seed 0 of everything first
: > "$queue"
for pair in $pairs; do q "zero_${pair} $FT arm $pair zero"; done
for seed in $seeds; do
    for pair in $pairs; do
        for arm in scratch dense scratch-scribbles scribbles; do
            q "${arm}_${pair}_s$seed $FT arm $pair $arm --seed $seed --steps $ft_steps $(base_of "$pair" "$seed")"
        done
    done
done
for seed in $seeds; do  # last: the base's early encoder layers only (docs/training.md, "An eighth look")
    for pair in $pairs; do
        [ "$pair" = shift ] && continue  # a study of new tasks: the same task keeps its decoder, whose encoder this breaks
        q "lv3_${pair}_s$seed $FT arm $pair dense --seed $seed --steps $ft_steps --set encoder_keep_levels=3 --tag lv3_dense_s$seed $(base_of "$pair" "$seed")"
    done
done
say "== 2. $(wc -l < "$queue") runs, $jobs at a time, until $(date -d @"$deadline" +%T 2>/dev/null || echo the deadline)"
xargs -P "$jobs" -L 1 bash -c 'run_one "$@"' _ < "$queue" | tee -a "$summary"

# -- 3. tables and the archive
say "== 3. results after $(($(date +%s) - start)) s"
$FT table 2>&1 | tee -a "$summary"
$FT compare "dense:scratch=dense: fine-tuned - from scratch" "scribbles:scratch-scribbles=scribbles" \
    "lv3_dense:scratch=dense, the encoder's 3 finest strides kept" --plot "$OUT/finetune_vs_scratch.png" 2>&1 | tee -a "$summary"
find "$work/runs" -name '*.json' -o -name 'curves.png' -o -name 'restorations.png' | sed "s|^$work/||" > "$work/files"
tar czf "$OUT/gpu_transfer.tar.gz" -C "$work" logs -T "$work/files" \
    && say "archive: gpu_transfer.tar.gz ($(du -h "$OUT/gpu_transfer.tar.gz" | cut -f1))"
