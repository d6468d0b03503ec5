#!/usr/bin/env bash
# The accelerator figures in one run, with nothing fetched from a network:
#   1. the train step at the paper geometry (ViT-B/32, 16 frames x 2 streams, 224 px) in bf16 and
#      fp32 at batch 8 and 32, with a profile of the first (bf16, batch 8);
#   2. the end-to-end figures (caer_jax/bench_end_to_end.py): start-up cold and warm, training with
#      the data pipeline and the loop against the step alone, eval, pipeline per core.
#
#   launch/gpu_bench.sh OUT_DIR [DATA_DIR]
#
# DATA_DIR is a TFDS data_dir holding raer/224px (TensorFlow is needed to build it, not here); the
# default .benchdata/tfds is what `launch/gpu_bench.sh --prepare` builds on a machine that has the
# build extra: 10 synthetic clips of 100-104 frames of 640x480, small enough to carry, repeated
# in the run (--e2e_repeat) to feed many steps. Python packages missing on the GPU host travel as
# wheels in .whl/ (installed into /tmp/site). PARTS=steps or PARTS=e2e runs one part only (a
# second try within one device call), e.g. the end to end part with XLA's autotuning results
# kept out of the compilation cache:
#   PARTS=e2e JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=none launch/gpu_bench.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --prepare ]]; then
  exec .venv/bin/python -c 'import sys; from caer_jax import bench_end_to_end as b
b.build_raer_length_clips(__import__("pathlib").Path(".benchdata"), 10, max_frames=104)'
fi
out=${1:?usage: launch/gpu_bench.sh OUT_DIR [DATA_DIR] | --prepare}
data=${2:-.benchdata/tfds}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'

quiet() { grep -v -E '^(W|I)[0-9]{4} |^WARNING|Warning' || true; }

parts=${PARTS:-steps,e2e}
if [[ ,$parts, == *,steps,* ]]; then
  timeout "${STEP_TIMEOUT:-270}" python3 -m caer_jax.bench --skip_data --build_clips=0 \
    --paper_dtypes=bfloat16,float32 --paper_batches=8,32 --matmul_size=8192 --repeats=10 \
    --profile_dir=/tmp/caer_profile --out="$out/steps.json" 2>&1 | quiet
  echo "step table: exit ${PIPESTATUS[0]}"
fi
if [[ ,$parts, == *,e2e,* ]]; then
  timeout "${E2E_TIMEOUT:-300}" python3 -m caer_jax.bench --skip_data --skip_paper \
    --build_clips=0 --end_to_end --data_dir="$data" --e2e_repeat="${E2E_REPEAT:-16}" \
    --e2e_batch=8 --e2e_epochs=2 --paper_dtypes=bfloat16 --e2e_workers=0,4,8,16 \
    --e2e_pipeline_batches=10 --matmul_size=8192 --repeats=10 --out="$out/end_to_end.json" 2>&1 \
    | quiet
  echo "end to end: exit ${PIPESTATUS[0]}"
fi
