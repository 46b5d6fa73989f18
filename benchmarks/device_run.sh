#!/usr/bin/env bash
# The GPU session's commands, for the lent GPU machine (the device tool's `run`) or any CUDA
# machine. Stages (one device call each; the lent machine gives 15 minutes of device time in
# all and 10 minutes per command, so each stage stays well inside ~8 minutes):
#   check  the WHOLE test suite on CUDA (the kernel-vs-reference grid with compiled kernels +
#          the GPU-only tests; CPU-only tests skip), the self-check, the epilogue's per-call
#          time before/after issue 10, then the launch-config sweep
#   bench  the benchmark suite (python -m benchmarks.run; arguments after the stage go to it,
#          e.g. --resume FILE, -k EXPR, --impls ...)
#   tp     vocabulary-parallel on-policy logits, general vs one-pass mode (benchmarks/tp_bench.py:
#          NCCL over the GPUs present; on one GPU, a group of one rank at the slice sizes of
#          tp = 2 and 8), ~1-2 minutes
#   all    check, then bench, then tp (a CUDA machine without the device tool's limits)
#
# From the development machine:
#   bash benchmarks/fetch_wheels.sh          # once: liger-kernel wheel into .whl/ (ignored)
#   run(command="OPO_BENCH_COMMIT=$(git rev-parse HEAD) bash benchmarks/device_run.sh check",
#       carry=[".whl"], timeout_s=560)
#   run(command="OPO_BENCH_COMMIT=<sha> bash benchmarks/device_run.sh bench", carry=[".whl"],
#       timeout_s=560)
#   # back here: copy <device>.json from files_at to benchmarks/results/, then
#   python -m benchmarks.run --report-only benchmarks/results/<device>.json
#
# Everything goes under $OUT when set (the device tool returns at most 8 files from there):
# log.txt (all output), suite.xml (JUnit: the suite's pass counts), sweep.jsonl, <device>.json,
# .png, .md. Without $OUT: benchmarks/results/ and the README's table.
# Time limits (seconds): OPO_SUITE_TIMEOUT_S (default 300), OPO_SWEEP_BUDGET_S (120: no new
# sweep shape starts after it), OPO_BENCH_BUDGET_S (360 for bench alone: no new row after it).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-check}
[ $# -gt 0 ] && shift
case "$stage" in all|check|bench|tp) ;; *) echo "usage: $0 [check|bench|tp|all] [run.py args]"; exit 2;; esac

export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the image's own packages
fi
if [ -n "${OUT:-}" ]; then
  out_dir=$OUT
  readme_args=(--no-readme)
else
  out_dir=benchmarks/results
  readme_args=()
fi
mkdir -p "$out_dir"
log="$out_dir/log.txt"

{
  # the card as found (read-only queries: clocks, power limit, memory in use)
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
    --format=csv 2>&1
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', \
triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import liger_kernel; print('liger-kernel importable')" 2>&1 | tail -1
  echo "[device_run] commit ${OPO_BENCH_COMMIT:-unknown} stage $stage"
} 2>&1 | tee -a "$log"

rc=0
if [ "$stage" = all ] || [ "$stage" = check ]; then
  start=$(date +%s)
  # Parallel workers (pytest-xdist is in the GPU image): the suite's time on a fresh machine is
  # mostly Triton compiling the 361 kernel variants it launches for sm_90 (0.1-0.5 s each for
  # the row kernels, 3-5 s for the epilogue on one process of the 2-core development machine;
  # benchmarks/suite_variants.py counts them).
  # Several processes share the one GPU; the largest GPU tests hold ~20 GB each.
  xdist=()
  python3 -c "import xdist" 2>/dev/null && xdist=(-n "${OPO_SUITE_WORKERS:-8}")
  # SIGINT at the limit: pytest then stops cleanly and still writes the summary and suite.xml
  timeout -s INT -k 30 "${OPO_SUITE_TIMEOUT_S:-300}" python3 -m pytest -q -p no:cacheprovider \
    tests ${xdist[@]+"${xdist[@]}"} -rfE --durations=15 --junitxml="$out_dir/suite.xml" \
    2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "[device_run] suite on CUDA: exit code $rc, $(( $(date +%s) - start )) s" | tee -a "$log"
  timeout 120 python3 -m opo_kernels 2>&1 | tee -a "$log"
  echo "[device_run] self-check exit code ${PIPESTATUS[0]}" | tee -a "$log"
  timeout 90 python3 -m benchmarks.epilogue_bench --out "$out_dir" 2>&1 | tee -a "$log"
  echo "[device_run] epilogue bench exit code ${PIPESTATUS[0]}" | tee -a "$log"
  timeout 300 python3 -m benchmarks.sweep --out "$out_dir" \
    --budget-s "${OPO_SWEEP_BUDGET_S:-120}" 2>&1 | grep -v '^{"kind"' | tee -a "$log"
  echo "[device_run] sweep exit code ${PIPESTATUS[0]}" | tee -a "$log"
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  python3 -m benchmarks.run --out "$out_dir" --budget-s "${OPO_BENCH_BUDGET_S:-360}" \
    ${readme_args[@]+"${readme_args[@]}"} "$@" 2>&1 | tee -a "$log"
  brc=${PIPESTATUS[0]}
  echo "[device_run] benchmark exit code $brc" | tee -a "$log"
  [ "$rc" -eq 0 ] && rc=$brc
fi
if [ "$stage" = all ] || [ "$stage" = tp ]; then
  timeout 240 python3 -m benchmarks.tp_bench --out "$out_dir" 2>&1 | tee -a "$log"
  trc=${PIPESTATUS[0]}
  echo "[device_run] tp bench exit code $trc" | tee -a "$log"
  [ "$rc" -eq 0 ] && rc=$trc
fi
exit "$rc"
