#!/usr/bin/env bash
# The GPU session's one command, for the lent GPU machine (the device tool's `run`), or any
# CUDA machine. Stages: all (default) = GPU tests, then the benchmark; tests; bench.
# Arguments after the stage go to `python -m benchmarks.run` (e.g. --resume FILE, -k EXPR).
#
# From the development machine:
#   bash benchmarks/fetch_wheels.sh          # once: liger-kernel wheel into .whl/ (ignored)
#   run(command="OPO_BENCH_COMMIT=<sha of HEAD> bash benchmarks/device_run.sh",
#       carry=[".whl"], timeout_s=600)
#   # rows left (time budget)? copy <device>.json from files_at to benchmarks/results/, then
#   run(command="OPO_BENCH_COMMIT=<sha> bash benchmarks/device_run.sh bench \
#       --resume benchmarks/results/<device>.json", carry=[".whl"], timeout_s=600)
#   # back here: python -m benchmarks.run --report-only benchmarks/results/<device>.json
#
# Writes under $OUT when set (the device tool returns at most 8 files from there: nvidia-smi.txt,
# gpu-tests.log, bench.log, <device>.json/.png/.md/.pytest-benchmark.json), else under
# benchmarks/results/ and then also updates README.md's table.
# OPO_BENCH_BUDGET_S: seconds after which no new benchmark row starts (default 240 with the
# tests, 420 for bench alone: the device tool stops a command at 600 s).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
[ $# -gt 0 ] && shift
case "$stage" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench] [run.py args]"; exit 2;; esac

export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -n "${OUT:-}" ]; then
  out_dir=$OUT
  readme_args=(--no-readme)
else
  out_dir=benchmarks/results
  readme_args=()
fi
mkdir -p "$out_dir"

# the card as found (read-only queries: clocks, power limit, memory in use)
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
  --format=csv 2>&1 | tee "$out_dir/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available()); import liger_kernel; print('liger-kernel importable')" \
  2>&1 | tee -a "$out_dir/nvidia-smi.txt"

rc=0
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  timeout "${OPO_TESTS_TIMEOUT_S:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider tests \
    2>&1 | tee "$out_dir/gpu-tests.log"
  rc=${PIPESTATUS[0]}
  echo "[device_run] GPU tests exit code $rc"
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  default_budget=420
  [ "$stage" = all ] && default_budget=240
  python3 -m benchmarks.run --out "$out_dir" --budget-s "${OPO_BENCH_BUDGET_S:-$default_budget}" \
    ${readme_args[@]+"${readme_args[@]}"} "$@" 2>&1 | tee "$out_dir/bench.log"
  brc=${PIPESTATUS[0]}
  echo "[device_run] benchmark exit code $brc"
  [ "$rc" -eq 0 ] && rc=$brc
fi
exit "$rc"
