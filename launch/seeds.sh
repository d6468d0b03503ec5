#!/usr/bin/env bash
# One training per seed: runs COMMAND ARGS --config.seed=S --workdir=WORKDIR/seed_S for each seed,
# one after the other; the first to fail stops the loop.
#
#   launch/seeds.sh [--dry-run] SEEDS WORKDIR COMMAND ARGS...
#   launch/seeds.sh 42,43,44 runs/synthetic_tiny \
#       launch/with_jemalloc.sh .venv/bin/python -m caer_jax.train --config=configs/synthetic_tiny.py
#   launch/seeds.sh 42,43,44 /shared/runs/b32 sbatch launch/slurm_gpu.sbatch --config=configs/clip_caer_b32.py
#
# Here the trainings run in sequence; with sbatch as the COMMAND each seed is its own cluster job
# (sbatch returns at once). `python -m caer_jax.report WORKDIR` then prints the mean +- standard
# deviation over the seeds and each seed's row.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,12p' "$0"; exit 0; fi
if [[ $# -lt 3 ]]; then
  echo "usage: $0 [--dry-run] SEEDS WORKDIR COMMAND ARGS... (SEEDS: comma-separated, e.g. 42,43,44)" >&2
  exit 2
fi
seeds_arg="$1" workdir="$2"; shift 2
if [[ ! "$seeds_arg" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "SEEDS must be comma-separated non-negative integers (e.g. 42,43,44), got '$seeds_arg'" >&2
  exit 2
fi
for arg in "$@"; do
  case "$arg" in
    --workdir|--workdir=*|--config.seed|--config.seed=*)
      echo "$arg: seeds.sh sets the workdir and the seed of each run itself" >&2
      exit 2 ;;
  esac
done
IFS=, read -ra seeds <<< "$seeds_arg"
if [[ $(printf '%s\n' "${seeds[@]}" | sort | uniq -d) ]]; then
  echo "SEEDS lists a seed twice: '$seeds_arg'" >&2
  exit 2
fi

for seed in "${seeds[@]}"; do
  cmd=("$@" "--config.seed=$seed" "--workdir=$workdir/seed_$seed")
  if [[ $dry_run -eq 1 ]]; then
    echo "${cmd[*]}"
    continue
  fi
  echo "seeds.sh: seed $seed: ${cmd[*]}" >&2
  "${cmd[@]}" || { code=$?; echo "seeds.sh: seed $seed failed (status $code)" >&2; exit "$code"; }
done
