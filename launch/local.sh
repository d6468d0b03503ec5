#!/usr/bin/env bash
# N training (or eval) processes on this machine, joined over 127.0.0.1 with CPU collectives:
# the multi-host code path without a cluster.
#
#   launch/local.sh [--dry-run] [--devices-per-process K] [--port P] N MODULE ARGS...
#   launch/local.sh 2 caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/two_hosts
#
# Each process sees K fake CPU devices (default 1) and runs under with_jemalloc.sh; logs go to
# WORKDIR-independent files local-<i>.log in $LOG_DIR (default: the current directory).
# The first process to fail stops the others; the exit status is 1 then, else 0.
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

# The first process to fail stops the rest: its peers would otherwise wait minutes in
# jax.distributed's registration or a collective for a process that is gone. SIGKILL, not SIGTERM:
# SIGTERM asks training for a checkpoint, which needs every process.
declare -A live  # pid -> process index
for i in "${!pids[@]}"; do live[${pids[$i]}]=$i; done
status=0
while [[ ${#live[@]} -gt 0 ]]; do
  code=0
  wait -n -p finished "${!live[@]}" || code=$?
  i="${live[$finished]}"
  unset "live[$finished]"
  [[ $code -eq 0 ]] && continue
  if [[ $status -ne 0 ]]; then
    echo "process $i stopped (status $code)" >&2
    continue
  fi
  status=1
  echo "process $i failed (status $code); last lines of $log_dir/local-$i.log:" >&2
  tail -n 20 "$log_dir/local-$i.log" >&2
  if [[ ${#live[@]} -gt 0 ]]; then
    echo "stopping the other processes" >&2
    kill -KILL "${!live[@]}" 2> /dev/null || true
  fi
done
exit $status
