#!/usr/bin/env bash
# The ONE prepared device run: GPU parity tests, then the measured benchmark matrix, then the
# end-to-end step, each stage under its own time limit so that one slow stage cannot eat the
# others' time (a task's whole device budget is 15 minutes, start-up included; one command may
# run 600 s). Logs and results go to $OUT (the device tool brings that folder back) or to
# benchmarks/results/gpu_check/. Before calling: benchmarks/fetch_wheels.sh, and carry .whl:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# Stage limits (seconds) can be overridden: PARITY_S, NCE_S, BUDGETS_S, CDDS_S, STEP_S; STAGES
# picks stages (default "parity nce budgets cdds step"), e.g. to finish in a second call what a
# first one cut short; PARITY_WORKERS sets the parity stage's pytest-xdist workers (default 8).
# The limits sum to 560 s: 30 s are left for installing and start-up.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, keep the log, print its tail
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -n "${TAIL:-40}" "$OUT/$name.log"
}

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# editable install: a plain PYTHONPATH copy of the repo would be shadowed by ./cdds_fast
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -n 30 "$OUT/install.log"; exit 1; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s'; } | tee "$OUT/env.txt"

STAGES=${STAGES:-parity nce budgets cdds step}
want() { [[ " $STAGES " == *" $1 "* ]]; }
# 1. correctness first: every kernel's parity tests natively (CUDA present: slow tests run too;
#    all failures reported, not only the first). test_fused_loss.py also holds the CUDA-only
#    checks of a CDDS step: no host synchronisation (sync debug mode "error"), a CUDA-graph
#    capture of forward + backward replaying equal to eager, fullgraph compile with inductor;
#    test_head_compile.py compiles the head (fullgraph, inductor)
#    Eight pytest-xdist workers (in the image) share the one GPU: the stage's time is mostly
#    Triton compiling each test's specialisations on the host, one core per process (Triton's
#    on-disk cache is shared, so a kernel compiled by one worker is reused by the others)
XDIST=$(python3 -c "import xdist" 2> /dev/null && echo "-n ${PARITY_WORKERS:-8}")
want parity && stage parity "${PARITY_S:-150}" python3 -m pytest -q -p no:cacheprovider $XDIST \
  --maxfail=25 --durations=10 tests/test_contrastive.py tests/test_sampling.py tests/test_stats.py \
  tests/test_normalize.py tests/test_constraints.py tests/test_fused_loss.py \
  tests/test_head_compile.py
# 2. InfoNCE matrix: every path (rule, fused, blocked, blocked TF32), ClipLoss, compiled ClipLoss
#    (bf16), Inf-CL; B 4096/16384/65536, D 512, fp32 and bf16; TFLOP/s and cost-model fraction
want nce && stage nce "${NCE_S:-170}" python3 benchmarks/report.py --skip-cdds \
  --out "$OUT/report_nce"
# 3. the blocked path's scratch budget (MiB): time and peak memory, bf16
want budgets && stage budgets "${BUDGETS_S:-50}" python3 benchmarks/bench_contrastive.py \
  --sizes 16384 65536 --dtypes bf16 --budgets 64 128 192 256
# 4. CDDS loss matrix: fast / eager / torch.compile (compiled for bf16 only, to fit the budget);
#    last, after the report is written, the sampling tiles at 4 vs 8 elements a thread
want cdds && stage cdds "${CDDS_S:-120}" python3 benchmarks/report.py --skip-contrastive \
  --compile-dtypes bfloat16 --out "$OUT/report_cdds"
# 5. end-to-end ViT-B/32 step, batch 256, bf16 autocast, with the z sweep
want step && stage step "${STEP_S:-70}" python3 benchmarks/bench_step.py
cat "$SUMMARY"
