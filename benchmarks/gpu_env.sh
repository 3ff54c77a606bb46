# Sourced by gpu_check.sh (once it has set name, rehearse, data, work and OUT) and by the queue scripts gpu_transfer.sh
# and gpu_pretrain.sh (once they have set name, rehearse, data and budget; here: the check that all three data sets
# are there, the deadline, $work and $OUT): the Python to run (the GPU image's, with .gpu/whl installed beside it; this
# checkout's .venv with --rehearse), the benchmarks' environment, $summary with say(), the machine's lines at the top
# of the summary, and for the queues run_one and q.
if [ -n "${budget:-}" ]; then
    for set in isbi2012 epfl_mito nasa_super; do
        [ -d "$data/$set" ] || { echo "$name: $data/$set is missing (run benchmarks/gpu_kit.sh here, carry .gpu)"; exit 1; }
    done
    start=$(date +%s); deadline=$((start + budget))
    OUT=${OUT:-/tmp/${name}_out}
    work=/tmp/$name; rm -rf "$work"; mkdir -p "$OUT" "$work/logs"
fi
PY=${PYTHON:-python3}
if [ -n "$rehearse" ]; then  # here: this checkout's environment, not the GPU image's Python 3.12 wheels
    PY=${PYTHON:-.venv/bin/python}
    export PYTHONPATH=$PWD
elif [ -d .gpu/whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
        || { echo "$name: installing .gpu/whl failed (run benchmarks/gpu_kit.sh here and carry .gpu)"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 EMSEG_BENCH_DATA=$data EMSEG_BENCH_RUNS=$work/runs
summary=$OUT/summary.txt; : > "$summary"
say() { echo "$*" | tee -a "$summary"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1; } | tee -a "$summary"
if [ -n "${budget:-}" ]; then  # the queues' runs, one compute thread each
    export OMP_NUM_THREADS=1 PY deadline work
fi

# one queued run: NAME COMMAND...; skipped when the budget is spent, stopped when it runs out (xargs calls it: exported)
run_one() {
    local name=$1; shift
    local left=$((deadline - $(date +%s)))
    if [ "$left" -lt 15 ]; then echo "skipped $name (budget spent)"; return 0; fi
    local t0=$(date +%s)
    timeout "$left" "$@" > "$work/logs/$name.log" 2>&1
    echo "$name: exit $? in $(($(date +%s) - t0)) s"
}
export -f run_one
# q NAME COMMAND...: a line of the file $queue, without trailing blanks (xargs -L would join the next line to it)
q() { echo "$*" | sed 's/[[:space:]]*$//' >> "$queue"; }
