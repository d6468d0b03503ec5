#!/usr/bin/env bash
# Training on a Cloud TPU VM pod: plan the config for the pod's chips here, create (or reuse) the
# pod, install the project on every worker, and run the same command on all workers;
# jax.distributed reads the pod's topology itself.
#
#   launch/tpu_pod.sh [--dry-run] [--no-plan] NAME ZONE ACCELERATOR_TYPE -- TRAIN_ARGS...
#   launch/tpu_pod.sh caer-b16 us-central2-b v4-32 -- --config=configs/clip_caer_b32.py \
#       --workdir=gs://bucket/runs/b32 --config.data.data_dir=gs://bucket/tfds
#
# First, on this machine, `python -m caer_jax.plan` compiles the train step of --config (with its
# --config.* overrides) for ACCELERATOR_TYPE with the TPU compiler of libtpu (pip install -e
# '.[tpu]'; no TPU needed) and prints its memory, collectives and predicted speed per chip; a
# step that does not fit a chip's HBM stops here with exit status 2, before any pod exists.
# --no-plan skips that. PYTHON (default python3) is the interpreter that plans.
#
# Needs gcloud with a project set. RUNTIME (default tpu-ubuntu2204-base) picks the VM image,
# REPO_URL (default: this checkout's origin) what the workers clone.
set -euo pipefail

dry_run=0 plan=1
while [[ "${1:-}" == --dry-run || "${1:-}" == --no-plan ]]; do
  if [[ "$1" == --dry-run ]]; then dry_run=1; else plan=0; fi
  shift
done
if [[ $# -lt 4 || "$4" != "--" ]]; then
  echo "usage: $0 [--dry-run] [--no-plan] NAME ZONE ACCELERATOR_TYPE -- TRAIN_ARGS..." >&2
  exit 2
fi
name="$1" zone="$2" accel="$3"; shift 4
runtime="${RUNTIME:-tpu-ubuntu2204-base}"
repo_url="${REPO_URL:-$(git config --get remote.origin.url || echo REPO_URL)}"
train_args=$(printf ' %q' "$@")

run() {
  if [[ $dry_run -eq 1 ]]; then echo "$*"; else "$@"; fi
}
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

if [[ $plan -eq 1 ]]; then
  # The config and its overrides are what the plan compiles; the other training flags are not its.
  plan_args=()
  for arg in "$@"; do
    if [[ "$arg" == --config=* || "$arg" == --config.* ]]; then plan_args+=("$arg"); fi
  done
  run "${PYTHON:-python3}" -m caer_jax.plan --topology="$accel" --programs=train \
    --fail_if_not_fits "${plan_args[@]}"
fi
if [[ $dry_run -eq 1 ]] || ! gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
    --accelerator-type="$accel" --version="$runtime"
fi
on_all_workers "set -e; [ -d caer_jax ] || git clone $repo_url caer_jax; cd caer_jax && git pull --ff-only \
  && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
on_all_workers "cd caer_jax && CAER_DISTRIBUTED=auto .venv/bin/python -m caer_jax.train$train_args"
