#!/usr/bin/env bash
# N training (or eval) processes on this machine, joined over 127.0.0.1 with CPU collectives:
# the multi-host code path without a cluster.
#
#   launch/local.sh [--dry-run] [--devices-per-process K] [--port P] N MODULE ARGS...
#   launch/local.sh 2 caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/two_hosts
#
# Each process sees K fake CPU devices (default 1) and runs under with_jemalloc.sh; logs go to
# WORKDIR-independent files local-<i>.log in $LOG_DIR (default: the current directory).
set -euo pipefail

dry_run=0 devices=1 port=12355
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] [--devices-per-process K] [--port P] N MODULE ARGS..." >&2
  exit 2
fi
n="$1" module="$2"; shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$n'" >&2; exit 2; }
python="${PYTHON:-python}"
log_dir="${LOG_DIR:-.}"
here="$(cd "$(dirname "$0")" && pwd)"

pids=()
for ((i = 0; i < n; i++)); do
  env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
            JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i")
  if [[ $dry_run -eq 1 ]]; then
    echo "env ${env_vars[*]} $here/with_jemalloc.sh $python -m $module $* > $log_dir/local-$i.log 2>&1 &"
    continue
  fi
  env "${env_vars[@]}" "$here/with_jemalloc.sh" "$python" -m "$module" "$@" \
    > "$log_dir/local-$i.log" 2>&1 &
  pids+=($!)
done
[[ $dry_run -eq 1 ]] && exit 0

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; last lines of $log_dir/local-$i.log:" >&2
    tail -n 20 "$log_dir/local-$i.log" >&2
    status=1
  fi
done
exit $status
