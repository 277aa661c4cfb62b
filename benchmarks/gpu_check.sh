#!/usr/bin/env bash
# Issue 7's GPU measurements in one call (its parts' time limits add up to under 10
# minutes; a failing or slow part does not stop the others):
#   1. the CNN workload at 100 and 1,000 clients, GEMM vs XLA convolutions, TF32 (the GPU
#      default), then GEMM at full float32 and in mixed precision (bfloat16 compute);
#   2. W1 at 10^3 ... 10^6 clients and W2 at 10^3 ... 10^5, unchunked, chunked and
#      streamed from host memory;
# every row with its shares of the card's matmul rate and copy bandwidth measured in the
# same run, what bounds it, and a profile of one round (top operations by device time).
#
#   bash benchmarks/gpu_check.sh            # writes results/gpu/ (log, CSVs, figure)
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   CNN_CLIENTS=2 W1_CLIENTS=10,100 W2_CLIENTS=10 CHUNK=50 bash benchmarks/gpu_check.sh
#                                           # a dry run of the script on a CPU
# Needs jax with CUDA, flax, optax, absl-py, numpy, pandas, seaborn (no install step: the
# project runs from the checkout through PYTHONPATH).
set -u
OUT=${OUT:-results/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2
PROFILES=${PROFILES:-/tmp/fedjax_dx_profiles}
CNN_CLIENTS=${CNN_CLIENTS:-100,1000}
W1_CLIENTS=${W1_CLIENTS:-1000,100000,1000000}
W2_CLIENTS=${W2_CLIENTS:-1000,10000,100000}
CHUNK=${CHUNK:-}
LOG="$OUT/gpu_check.log"
: >"$LOG"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, append to the log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e '^[IW][0-9]\{4\} ' | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG"

LARGEST_CNN=${CNN_CLIENTS##*,}
part cnn_tf32 170 "$PYTHON" -m benchmarks.cnn --clients="$CNN_CLIENTS" --convs=gemm,xla \
  --repeats=5 --out="$OUT/cnn_tf32.csv" --profile_dir="$PROFILES/cnn_tf32"
part cnn_highest 75 "$PYTHON" -m benchmarks.cnn --clients="$LARGEST_CNN" --convs=gemm \
  --repeats=5 --matmul_precision=highest --out="$OUT/cnn_highest.csv"
part cnn_bf16 75 "$PYTHON" -m benchmarks.cnn --clients="$LARGEST_CNN" --convs=gemm \
  --repeats=5 --compute_dtype=bfloat16 --out="$OUT/cnn_bf16.csv"
part scale_w1 130 "$PYTHON" -m benchmarks.scale --workloads=W1 --clients="$W1_CLIENTS" \
  --chunk="${CHUNK:-100000}" --stream --max_memory_gb=60 --repeats=5 \
  --out="$OUT/scale_w1.csv" --profile_dir="$PROFILES/scale_w1"
part scale_w2 100 "$PYTHON" -m benchmarks.scale --workloads=W2 --clients="$W2_CLIENTS" \
  --chunk="${CHUNK:-25000}" --stream --max_memory_gb=60 --repeats=5 \
  --out="$OUT/scale_w2.csv" --figure="$OUT/scale_w2.png" --profile_dir="$PROFILES/scale_w2"
echo "=== done; files in $OUT"
