#!/usr/bin/env bash
# Accelerator checks and benchmarks on a lent NVIDIA GPU: under 8 minutes, nothing downloaded.
#
# The machine has jax (CUDA), flax, optax, orbax-checkpoint, torch and timm but no network; the
# few packages it lacks come as wheels in benchmarks/wheels/ (`make gpu-wheels` here; the
# folder is git-ignored, so carry it with the working tree) and go into a private folder on
# PYTHONPATH with `pip install --no-index`. Results land in $OUT (default benchmarks/gpu/):
#
#   machine.txt                  nvidia-smi, jax devices, versions
#   attention.log                tests/test_attention.py and tests/test_layers.py on the GPU
#                                (cuDNN vs reference, the 2-D matmul Dense vs Flax's)
#   step_gpu.{json,md}           ViT-B/16, 224 px, batch 256, bf16: tljax (XLA's attention) vs
#                                timm eager and timm + torch.compile, img/s and MFU; the tljax
#                                step with Flax's N-D Dense dots too (tljax_nd_dense)
#   step_gpu_cudnn_attention.*   the tljax step with cuDNN's attention (jax 0.11.2 with cuDNN
#                                9.19 refuses the 197 tokens in training: the error is recorded)
#   step_gpu_flags_*.*           the tljax step under candidate XLA flags (one process each)
#   memory_gpu.{json,md}         ViT-L/16 full fine-tuning, batch 128, peak memory per device
#   input_gpu.{json,md}          JPEG pipeline examples/s against worker processes
#
# Parts run in order of importance; a part is skipped when the time left (BUDGET seconds,
# default 450 from the start) is below what it needs, and each is cut at the time left.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${BUDGET:-450}
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

SITE=$(mktemp -d)
if ! ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
  echo "benchmarks/wheels/ is empty: run 'make gpu-wheels' and carry the folder." | tee "$OUT/error.txt"
  exit 2
fi
if ! "$PY" -m pip install -q --no-index --no-deps --target "$SITE" benchmarks/wheels/*.whl; then
  # No pip: a wheel is a zip archive of the files of its site-packages entry.
  for wheel in benchmarks/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# A fresh compilation cache: compile times are part of what is reported.
export TLJAX_COMPILATION_CACHE=$(mktemp -d)
export TF_CPP_MIN_LOG_LEVEL=2
# JAX and torch share the GPU in the step benchmark: no 75% preallocation by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

left() { echo $(( BUDGET - (SECONDS - START) )); }
part() {  # part NAME SECONDS_NEEDED COMMAND...
  local name=$1 need=$2
  shift 2
  if [ "$(left)" -lt "$need" ]; then
    echo "[gpu.sh] skipped $name: $(left) s left, needs $need" | tee -a "$OUT/skipped.txt"
    return
  fi
  echo "[gpu.sh] $name (t=$((SECONDS - START)) s)"
  timeout "$(left)" "$@" > "$OUT/$name.log" 2>&1
  echo "[gpu.sh] $name exit $? (t=$((SECONDS - START)) s)"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi; "$PY" -c "import jax, flax, optax, torch, timm; print(jax.devices()); \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'torch', torch.__version__, 'timm', timm.__version__)"; nproc; uptime; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

STEP="tools/benchmark.py --suite=step --model=B/16 --res=224 --batch=256 --dtype=bfloat16 \
  --classes=1000 --reps=10 --out=$OUT"
# float32 parity at float32 precision (GPUs may otherwise multiply float32 in TF32).
part attention 45 env JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_layers.py
part step 240 "$PY" $STEP --attention=xla --torch_compile \
  --systems=tljax,tljax_nd_dense,tljax_lp,tljax_forward,timm,timm_compile
part input 50 "$PY" tools/benchmark.py --suite=input --workers=0,1,2,4,8,16 --batch=256 \
  --images=512 --steps=6 --out="$OUT"
part step_cudnn_attention 90 "$PY" $STEP --attention=cudnn --systems=tljax \
  --tag=_cudnn_attention
part memory 90 "$PY" tools/benchmark.py --suite=memory --model=L/16 --batch=128 \
  --dtype=bfloat16 --attention=xla --remat=none,full --scan --out="$OUT"
# Candidate XLA flags for one GPU (README, "Performance"): each in its own process.
part flags_no_triton_gemm 45 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
  "$PY" $STEP --attention=xla --systems=tljax --tag=_flags_no_triton_gemm
part flags_latency_hiding 45 env XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" \
  "$PY" $STEP --attention=xla --systems=tljax --tag=_flags_latency_hiding
echo "[gpu.sh] done in $((SECONDS - START)) s; results in $OUT"
