#!/usr/bin/env bash
# Everything to run on a CUDA machine, in stages; written for a GPU machine that is offline
# (the wheels it lacks are carried in .whl/, see fetch_wheels.sh) and lent for a limited time
# (each stage ends by a deadline). Stages:
#   lease  the essentials in ONE call for a time-limited run, ending by OPO_DEADLINE_S (default
#          540 s): the whole test suite on CUDA (<= 240 s), the self-check, host vs device time
#          of a call (benchmarks/host_overhead.py: eager vs CUDA-graph replay, the epilogue
#          alone too), the benchmark rows at the headline shapes (logits V = 151936 bf16
#          N = 16384, then fused-linear), and the focused launch-config sweep
#          (benchmarks/sweep.py --focus) in the time left. Each step's limit is cut to what is
#          left.
#   rest   straight after `lease`, on the same machine: the demo on CUDA (--quick), then the
#          benchmark rows not measured yet (--resume FILE), by OPO_DEADLINE_S (200)
#   again  a second, shorter run (~5 min): the suite on CUDA, the focused sweep, host vs device
#          time, then the rows not measured yet (--resume FILE), by OPO_DEADLINE_S (280)
#   check  the WHOLE test suite on CUDA (the kernel-vs-reference grid with compiled kernels +
#          the GPU-only tests; CPU-only tests skip), the self-check, the epilogue's per-call
#          time against the former torch epilogue (tools/gpu/epilogue_bench.py), host vs device
#          time of a call, then the sweep
#   bench  the benchmark suite (python -m benchmarks.run; arguments after the stage go to it,
#          e.g. --resume FILE, -k EXPR, --impls ...)
#   tp     vocabulary-parallel on-policy logits, general vs one-pass mode (benchmarks/tp_bench.py:
#          NCCL over the GPUs present; on one GPU, a group of one rank at the slice sizes of
#          tp = 2 and 8), ~1-2 minutes
#   all    check, then bench, then tp (a CUDA machine with no time limit)
#   verify ONE call of ~6 min (OPO_DEADLINE_S, default 360 s), before any measurement on a
#          machine that has not run the current code: the whole test suite on CUDA (compiled
#          kernels; the remembered-launch path of opo_kernels/launches.py is checked against
#          Triton's own, bit for bit, by tests/test_launch_cache_gpu.py), the self-check, the
#          host-time profile (benchmarks/host_profile.py), then OPOTrainer on CUDA
#          (tools/gpu/trl_check.py, bf16, every loss path; needs the trl/datasets wheels),
#          then OPOTrainer's default against GRPOTrainer's (benchmarks/trainer_bench.py, rows
#          OPO_TRAINER_RUNS, default grpo,opo, on- and off-policy).
#          Returns log.txt, suite.xml, host_profile.json (+ traces), <device>.trl_check.json,
#          <device>.trainer.json. In a 15-minute session: `verify` (limit 380 s), then `step` with
#          OPO_DEADLINE_S=<seconds left - 90>.
#   rows   ONE call (OPO_DEADLINE_S, default 330 s) of the kernel rows that a `step` call with
#          a deadline below 450 s leaves out: the fair logits rows at the target shape, then
#          the trainer micro-batch rows with the host-time column. Returns log.txt and
#          <device>.fair.json/.fair.md. E.g. `verify`, then `rows` in a session that already
#          has the step table, or after `step` on the same warm machine.
#   step   ONE call of ~9.5 min (OPO_DEADLINE_S, default 560 s): the RL-step benchmark
#          (benchmarks/step: Qwen2.5-0.5B- and Llama-3.2-1B-shaped models, 8k/4k/16k-token
#          micro-batches, every loss path, ours and the peers'), then the fused-linear rows
#          with their peers at both shapes (padded B16 T1024 H4096 V128256, packed N4096; the
#          peers' strongest settings before their defaults: Liger with TF32 and chunk_size = B,
#          cut-cross-entropy's torch_compile), then the kernel-level fair rows at the target
#          logits shape (strong torch, ours, Liger's GRPO loss at token then sequence level,
#          the reference), then the trainer micro-batch rows (N 1024/2048/4096, V 32000 and
#          151936, bf16, padded and packed: ours, Liger's cross-entropy and its GRPO loss at
#          both levels, with the host-time column) in what is left, into the same fair file.
#          Needs the peers' wheels (fetch_wheels.sh). Returns 5 files: log.txt,
#          <device>.step.json/.step.md, <device>.fair.json/.fair.md. Arguments after the stage
#          go to benchmarks.step.
#          Run again at once on the same warm machine, it resumes: only the rows the first
#          call did not reach are measured (/tmp/opo_step, /tmp/opo_kbench are kept there).
#
# A 15-minute session (device time, the machine's start included), .whl/ carried (the wheels
# of fetch_wheels.sh and, when built, tools/gpu/precompile.py's Triton cache):
#   OPO_BENCH_COMMIT=<commit> bash tools/gpu/device_run.sh verify            # limit 380 s
#   OPO_BENCH_COMMIT=<commit> OPO_DEADLINE_S=<seconds left - 90> \
#       bash tools/gpu/device_run.sh step                                    # limit +30 s
# "seconds left" as the device tool counts them just before the call; if the machine was
# given back in between (it stays held ~30 s after a call), a new start takes ~1-2 min of that
# time too: then <seconds left - 240>.
# then back home: copy the returned files to benchmarks/results/, and
#   python -m benchmarks.step --report-only benchmarks/results/<device>.step.json --readme README.md
#   python -m benchmarks.run --report-only benchmarks/results/<device>.fair.json --no-readme
#
# The older pair, `lease` then `rest` (suite, host overhead, headline rows, sweep, demo):
#   bash tools/gpu/fetch_wheels.sh        # once: the wheels the GPU machine lacks, into .whl/
#   python -m tools.gpu.precompile build  # optional, ~15 min, no GPU needed: the kernels
#       # compiled for the GPU machine's Triton (run it in a Python that has that Triton
#       # version; see tools/gpu/precompile.py), after the last edit of opo_kernels/
#   # copy the repository with .whl/ to the GPU machine, then there:
#   OPO_BENCH_COMMIT=<commit> bash tools/gpu/device_run.sh lease
#   # if time is left, at once on the same machine (its Triton cache is still warm):
#   cp <OUT>/<device>.json .whl/resume.json
#   OPO_BENCH_COMMIT=<commit> OPO_DEADLINE_S=<seconds left> bash tools/gpu/device_run.sh \
#       rest --resume .whl/resume.json
#   # back on the first machine: copy <device>.json to benchmarks/results/, then
#   python -m benchmarks.run --report-only benchmarks/results/<device>.json
#
# Everything goes under $OUT when set (`lease` writes 8 files: log.txt, suite.xml,
# host_overhead.json, sweep_focus.jsonl and the bench's <device>.json, .pytest-benchmark.json,
# .png, .md; `rest` 6: log.txt, demo_curves.json and the bench's four). Without $OUT:
# benchmarks/results/ and the table of docs/benchmarks.md.
# Time limits (seconds): OPO_SUITE_TIMEOUT_S (default 300), OPO_SWEEP_BUDGET_S (120: no new
# sweep shape starts after it), OPO_BENCH_BUDGET_S (360 for bench alone: no new row after it),
# OPO_DEADLINE_S (lease / rest: the whole call's end; every step is cut to fit it).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=${1:-check}
[ $# -gt 0 ] && shift
case "$stage" in lease|rest|again|all|check|bench|tp|step|verify|rows) ;;
  *) echo "usage: $0 [lease|rest|again|check|bench|tp|all|step|verify|rows] [run.py / step args]"
     exit 2;;
esac
start_all=$(date +%s)
case "$stage" in lease) deadline_s=${OPO_DEADLINE_S:-540};; rest) deadline_s=${OPO_DEADLINE_S:-200};;
  again) deadline_s=${OPO_DEADLINE_S:-280};; step) deadline_s=${OPO_DEADLINE_S:-560};;
  verify) deadline_s=${OPO_DEADLINE_S:-360};; rows) deadline_s=${OPO_DEADLINE_S:-330};;
  *) deadline_s=${OPO_DEADLINE_S:-1000000};; esac
deadline_s=${deadline_s%%.*}  # whole seconds (bash arithmetic): 330.7 -> 330
if ! [[ $deadline_s =~ ^[0-9]+$ ]]; then
  echo "OPO_DEADLINE_S must be a number of seconds, got '${OPO_DEADLINE_S:-}'"
  exit 2
fi
pct() { echo $(( deadline_s * $1 / 100 )); }  # PCT % of the deadline, in seconds
# cap WANT RESERVE: WANT seconds, cut so that RESERVE seconds are still left before the deadline
cap() {
  local left=$(( start_all + deadline_s - $(date +%s) - $2 ))
  (( left < $1 )) && set -- "$left"
  (( $1 < 5 )) && set -- 5
  echo "$1"
}

# HF_HUB_OFFLINE: no network there (transformers / datasets would only try and time out)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels_failed=
if compgen -G ".whl/*.whl" > /dev/null; then
  # on failure the stage goes on without them (the suite and the self-check need none; the
  # peers' rows and the TRL runs then record why they could not run)
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    # PYTHONPATH comes before site-packages: a carried wheel shadows the image's copy
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    wheels_failed=1
  fi
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
  # the benchmark peers (carried wheels): version, and why one cannot run here
  python3 -c "from benchmarks import peers; print('peers', peers.versions(), \
{p: peers.unavailable(p) or 'ok' for p in ('cce', 'trl_head', 'liger', 'torch_lce')})" 2>&1 | tail -3
  # the versions the carried wheels meet there (datasets 5.2 wants pyarrow >= 24)
  python3 -c "import importlib.metadata as m
def v(p):
    try: return m.version(p)
    except Exception: return None
print('packages', {p: v(p) for p in ('transformers', 'accelerate', 'trl', 'datasets', 'pyarrow',
      'fsspec', 'pandas', 'tqdm', 'huggingface_hub', 'peft', 'pytest', 'pytest-xdist')})" 2>&1
  [ -n "$wheels_failed" ] && echo "[device_run] installing the carried wheels FAILED: going on without them"
  echo "[device_run] commit ${OPO_BENCH_COMMIT:-unknown} stage $stage"
} 2>&1 | tee -a "$log"

# A Triton cache compiled on another machine for this one's Triton (tools/gpu/precompile.py
# build, carried in .whl/): the variants found there are not compiled here. unpack prints
# whether each part of Triton's cache key is the same here as where it was built.
carried=
if [ -f .whl/triton_cache.tar.xz ]; then
  export TRITON_CACHE_DIR=/tmp/opo_triton_cache
  timeout 60 python3 -m tools.gpu.precompile unpack .whl/triton_cache.tar.xz \
    "$TRITON_CACHE_DIR" 2>&1 | tee -a "$log"
  carried=$(timeout 10 python3 -m tools.gpu.precompile count "$TRITON_CACHE_DIR")
  touch /tmp/opo_unpacked  # what is compiled after this was not carried (listed at the end)
fi

rc=0
keep() { [ "$rc" -eq 0 ] && rc=$1; }  # the first failing step's exit code is the stage's

run_suite() {  # $1: time limit (s)
  local start=$(date +%s)
  # Parallel workers (pytest-xdist is in the GPU image): the suite's time on a fresh machine is
  # mostly Triton compiling the 361 kernel variants it launches for sm_90 (0.1-0.5 s each for
  # the row kernels, 3-5 s for the epilogue on one process of the 2-core development machine;
  # tools/gpu/suite_variants.py counts them).
  # Several processes share the one GPU; the largest GPU tests hold ~20 GB each.
  local xdist=()
  # 2026-12-04, H200: 12 workers ran it in 118 s with a warm cache; 8 did not finish in 172 s
  # with 161 variants to compile
  python3 -c "import xdist" 2>/dev/null && xdist=(-n "${OPO_SUITE_WORKERS:-12}")
  # SIGINT at the limit: pytest then stops cleanly and still writes the summary and suite.xml
  timeout -s INT -k 30 "$1" python3 -m pytest -q -p no:cacheprovider \
    tests ${xdist[@]+"${xdist[@]}"} -rfE --durations=15 --junitxml="$out_dir/suite.xml" \
    2>&1 | tee -a "$log"
  local src=${PIPESTATUS[0]}
  echo "[device_run] suite on CUDA: exit code $src, $(( $(date +%s) - start )) s (limit $1 s)" \
    | tee -a "$log"
  keep "$src"
}

run_selfcheck() {
  timeout "$1" python3 -m opo_kernels 2>&1 | tee -a "$log"
  echo "[device_run] self-check exit code ${PIPESTATUS[0]}" | tee -a "$log"
}

run_epilogue() {
  timeout "$1" python3 -m tools.gpu.epilogue_bench --out "$out_dir" 2>&1 | tee -a "$log"
  echo "[device_run] epilogue bench exit code ${PIPESTATUS[0]}" | tee -a "$log"
}

run_host_overhead() {
  timeout "$1" python3 -m benchmarks.host_overhead --out "$out_dir" 2>&1 | tee -a "$log"
  echo "[device_run] host overhead exit code ${PIPESTATUS[0]}" | tee -a "$log"
}

run_sweep() {  # $1: budget (no new shape after it), $2: time limit, then sweep.py's arguments
  local budget=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m benchmarks.sweep --out "$out_dir" --budget-s "$budget" "$@" \
    2>&1 | grep -v '^{"kind"' | tee -a "$log"
  echo "[device_run] sweep exit code ${PIPESTATUS[0]}" | tee -a "$log"
}

run_demo() {  # the demo's short run on CUDA (fused kernels); only its curves.json comes back
  local dir=/tmp/opo_demo_cuda
  timeout "$1" python3 -m opo_kernels.demo --device cuda --quick --no-progress --out "$dir" \
    2>&1 | tee -a "$log"
  echo "[device_run] demo exit code ${PIPESTATUS[0]}" | tee -a "$log"
  [ -f "$dir/curves.json" ] && cp "$dir/curves.json" "$out_dir/demo_curves.json"
}

run_bench() {  # $1: budget (no new row after it), $2: time limit, then run.py's arguments
  local budget=$1 limit=$2
  shift 2
  # SIGINT at the limit: the results JSON is rewritten after every row, so what was measured
  # stays; the plot and table are then made from it below
  timeout -s INT -k 20 "$limit" python3 -m benchmarks.run --out "$out_dir" --budget-s "$budget" \
    ${readme_args[@]+"${readme_args[@]}"} "$@" 2>&1 | tee -a "$log"
  local brc=${PIPESTATUS[0]}
  echo "[device_run] benchmark exit code $brc" | tee -a "$log"
  local results
  results=$(ls -t "$out_dir"/*.json 2>/dev/null | grep -v -e pytest-benchmark -e sweep \
            -e epilogue_bench -e tp_bench | head -1)
  if [ -n "$results" ] && [ ! -e "${results%.json}.md" -o "$results" -nt "${results%.json}.md" ]; then
    python3 -m benchmarks.run --report-only "$results" --no-readme 2>&1 | tee -a "$log"
  fi
  keep "$brc"
}

run_step_bench() {  # $1: budget (no new row after it), $2: time limit, then step's arguments
  local budget=$1 limit=$2 work=/tmp/opo_step prev resume=()
  shift 2
  mkdir -p "$work"
  # a second `step` call on the same (still warm) machine measures only the rows the first
  # one did not reach
  prev=$(ls -t "$work"/*.step.json 2>/dev/null | head -1)
  [ -n "$prev" ] && resume=(--resume "$prev")
  # SIGINT at the limit: the results file is rewritten after every row
  timeout -s INT -k 20 "$limit" python3 -m benchmarks.step --out "$work" --budget-s "$budget" \
    --warmup 2 ${resume[@]+"${resume[@]}"} "$@" 2>&1 | tee -a "$log"
  local src=${PIPESTATUS[0]}
  echo "[device_run] step benchmark exit code $src" | tee -a "$log"
  local results
  results=$(ls -t "$work"/*.step.json 2>/dev/null | head -1)
  if [ -n "$results" ]; then
    [ "$results" -nt "${results%.json}.md" ] && \
      timeout 60 python3 -m benchmarks.step --report-only "$results" >> "$log" 2>&1
    cp "$results" "${results%.json}.md" "$out_dir"/ 2>/dev/null
  fi
  keep "$src"
}

# the kernel-level rows of the step stage, into /tmp/opo_kbench, copied out as <device>.fair.*
KBENCH=/tmp/opo_kbench
run_kernel_rows() {  # $1: linear | fair | host, $2: budget, $3: time limit
  local what=$1 budget=$2 limit=$3 impls k resume=()
  if [ "$what" = linear ]; then
    impls=opo_kernels_fused_linear,opo_kernels_fused_linear_on_policy,opo_kernels_fused_linear_budget,opo_kernels_materialized,cce,trl_head,torch_lce,liger_fused_linear_gspo_tf32_chunkB,cce_torch_compile,liger_fused_linear_gspo_tf32,liger_fused_linear_gspo,cce_filtered
    k=H4096
  elif [ "$what" = fair ]; then
    impls=torch_compiled,opo_kernels,opo_kernels_inplace,opo_kernels_grad_to_base,opo_kernels_model_slice,liger_grpo_token,liger_gspo,compile,eager
    k=N16384-V151936-bf16-padded
  else  # host: the trainer micro-batch rows, with the host-time column (eager - replay)
    impls=opo_kernels,liger_ce,liger_grpo_token,liger_gspo
    k="(N1024- or N2048- or N4096-) and bf16 and not V128256"
  fi
  local prev
  prev=$(ls -t "$KBENCH"/*.json 2>/dev/null | grep -v pytest-benchmark | head -1)
  [ -n "$prev" ] && resume=(--resume "$prev")
  timeout -s INT -k 20 "$limit" python3 -m benchmarks.run --out "$KBENCH" --no-readme \
    --budget-s "$budget" --impls "$impls" -k "$k" ${resume[@]+"${resume[@]}"} 2>&1 \
    | tee -a "$log"
  local brc=${PIPESTATUS[0]}
  echo "[device_run] kernel rows ($what) exit code $brc" | tee -a "$log"
  local results
  results=$(ls -t "$KBENCH"/*.json 2>/dev/null | grep -v pytest-benchmark | head -1)
  if [ -n "$results" ]; then
    [ "$results" -nt "${results%.json}.md" ] && timeout 60 python3 -m benchmarks.run \
      --report-only "$results" --no-readme >> "$log" 2>&1
    local name
    name=$(basename "${results%.json}")
    cp "$results" "$out_dir/$name.fair.json"
    cp "${results%.json}.md" "$out_dir/$name.fair.md" 2>/dev/null
  fi
  keep "$brc"
}

run_host_profile() {
  timeout "$1" python3 -m benchmarks.host_profile --out "$out_dir" 2>&1 | tee -a "$log"
  echo "[device_run] host profile exit code ${PIPESTATUS[0]}" | tee -a "$log"
}

run_trl_check() {  # OPOTrainer on CUDA, every loss path, bf16 (the trainer's default precision)
  timeout -s INT -k 10 "$1" python3 -m tools.gpu.trl_check --out "$out_dir" --precisions bf16 \
    2>&1 | tee -a "$log"
  local trc=${PIPESTATUS[0]}
  echo "[device_run] trl check exit code $trc" | tee -a "$log"
  keep "$trc"
}

run_trainer_bench() {  # OPOTrainer's default against GRPOTrainer's default, both schedules
  timeout -s INT -k 10 "$1" python3 -m benchmarks.trainer_bench --out "$out_dir" \
    --runs "${OPO_TRAINER_RUNS:-grpo,opo}" 2>&1 | tee -a "$log"
  local trc=${PIPESTATUS[0]}
  echo "[device_run] trainer bench exit code $trc" | tee -a "$log"
  keep "$trc"
}

run_tp() {
  timeout "$1" python3 -m benchmarks.tp_bench --out "$out_dir" 2>&1 | tee -a "$log"
  local trc=${PIPESTATUS[0]}
  echo "[device_run] tp bench exit code $trc" | tee -a "$log"
  keep "$trc"
}

case "$stage" in
  lease)
    # each step: cap(its own limit, the seconds kept for the steps after it). Worst case at the
    # default 540 s: suite 240 (+30 s to stop), self-check 30, host overhead 40, benchmark rows
    # >= 100 s of budget, the sweep what is left; a quick suite leaves the time to the sweep.
    run_suite "$(cap 240 290)"
    run_selfcheck "$(cap 45 250)"
    run_host_overhead "$(cap 60 210)"
    # the headline rows come first in the grid (logits V = 151936 bf16 N = 16384, then
    # fused-linear B16 T1024 H4096 V128256); rows not started by the budget wait for `rest`
    run_bench "$(cap 120 150)" "$(cap 240 60)" "$@"
    left=$(cap 100000 15)
    run_sweep "$(( left > 30 ? left - 30 : 5 ))" "$left" --focus
    ;;
  rest)
    # the demo on CUDA, then more rows (`tp` runs the tensor-parallel bench)
    run_demo "$(cap 150 40)"
    run_bench "$(cap 100000 60)" "$(cap 100000 20)" "$@"
    ;;
  again)
    # worst case at the default 280 s: suite 150 (+30 s to stop), sweep 50, host overhead 30,
    # then rows (--resume) in what is left
    run_suite "$(cap 150 140)"
    run_sweep "$(cap 40 100)" "$(cap 50 90)" --focus
    run_host_overhead "$(cap 30 60)"
    run_bench "$(cap 100000 40)" "$(cap 100000 15)" "$@"
    ;;
  check|all)
    run_suite "${OPO_SUITE_TIMEOUT_S:-300}"
    run_selfcheck 120
    run_epilogue 90
    run_host_overhead 120
    run_sweep "${OPO_SWEEP_BUDGET_S:-120}" 300
    run_sweep 60 120 --focus
    if [ "$stage" = all ]; then
      run_bench "${OPO_BENCH_BUDGET_S:-360}" 100000 "$@"
      run_tp 240
    fi
    ;;
  bench) run_bench "${OPO_BENCH_BUDGET_S:-360}" 100000 "$@" ;;
  step)
    # the time kept for what follows scales with the deadline (D): the step benchmark (the
    # headline) starts no row once < 45 % of D is left and is stopped at 40 % (its rows so far
    # kept), the fused-linear rows end by 16 % left, the fair logits rows by 9 %, the trainer
    # micro-batch rows take the rest. At the default 560 s: step <= 270 s, fused-linear
    # <= 130 s, fair <= 100 s; below 450 s (340 s after `verify` in a 15-minute session) the
    # step rows and the fused-linear ones only: ~200 and ~100 s at 340 s.
    # A block of kernel rows first pays ~20 s (a process, pytest's collection, the session's
    # copy-bandwidth and matmul-rate measurements) and its first row a compile: one left less
    # than MIN_BLOCK_S would measure nothing, so it is skipped and its time goes to the rest
    # (a second `step` call on the warm machine resumes every block).
    block() {  # block WHAT BUDGET LIMIT
      if (( $3 < ${OPO_MIN_BLOCK_S:-45} )); then
        echo "[device_run] kernel rows ($1) skipped: $3 s left for them" | tee -a "$log"
      else
        run_kernel_rows "$@"
      fi
    }
    run_step_bench "$(cap 270 "$(pct 45)")" "$(cap 320 "$(pct 40)")" "$@"
    # the last block ends 30 s before the deadline: a process that ignores SIGINT is killed
    # 20 s after its limit, and its results are still copied out
    if (( deadline_s < ${OPO_FULL_STEP_S:-450} )); then
      # too short for four blocks (at 340 s the fair and host ones would get ~25 s each):
      # the fused-linear rows take the rest; the others wait for a later call
      block linear "$(cap 100000 60)" "$(cap 100000 30)"
      echo "[device_run] kernel rows (fair, host) left for a later call: deadline" \
        "$deadline_s s < ${OPO_FULL_STEP_S:-450} s" | tee -a "$log"
    else
      block linear "$(cap 90 "$(pct 23)")" "$(cap 130 "$(pct 16)")"
      block fair "$(cap 60 "$(pct 12)")" "$(cap 100 "$(pct 9)")"
      block host "$(cap 100000 45)" "$(cap 100000 30)"
    fi
    ;;
  verify)
    # at the default 360 s: suite <= 180 (+30 s to stop), self-check 20, the host profile
    # <= 75 (it keeps its rows if stopped), OPOTrainer on CUDA <= 45, OPOTrainer's default
    # against GRPOTrainer's (benchmarks/trainer_bench.py, rows grpo and opo, both schedules)
    # in what is left: >= 40 s once the suite takes <= 150 s (a carried Triton cache)
    run_suite "$(cap 180 170)"
    run_selfcheck "$(cap 20 150)"
    run_host_profile "$(cap 75 85)"
    run_trl_check "$(cap 45 40)"
    run_trainer_bench "$(cap 100000 20)"  # (killed 10 s after its limit at the latest)
    ;;
  rows)
    # the two blocks of kernel rows a short `step` call leaves out: the fair logits rows, then
    # the trainer micro-batch rows with the host-time column (each keeps its rows if stopped)
    run_kernel_rows fair "$(cap 130 "$(pct 55)")" "$(cap 170 "$(pct 45)")"
    run_kernel_rows host "$(cap 100000 45)" "$(cap 100000 30)"
    ;;
  tp) run_tp 240 ;;
esac
if [ -n "$carried" ]; then
  now=$(timeout 10 python3 -m tools.gpu.precompile count "$TRITON_CACHE_DIR")
  echo "[device_run] triton cache: $carried variants carried, $(( ${now:-$carried} - carried ))" \
    "compiled here" | tee -a "$log"
  # which, with their specialization: compared with the build's records, why they missed
  timeout 30 python3 -m tools.gpu.precompile new "$TRITON_CACHE_DIR" /tmp/opo_unpacked \
    >> "$log" 2>&1
fi
echo "[device_run] stage $stage: exit code $rc, $(( $(date +%s) - start_all )) s" | tee -a "$log"
exit "$rc"
