#!/usr/bin/env bash
# Runs a command with jemalloc preloaded and keeping the pages it frees (CPU hosts).
#
#   launch/with_jemalloc.sh COMMAND ARGS...
#   launch/with_jemalloc.sh python -m caer_jax.bench --out=runs/bench.json
#
# Why: XLA:CPU mallocs every execution's buffers (several GB of temporaries for a ViT-B/32 train
# step) and frees them when it ends. glibc hands blocks above 32 MB back to the kernel at once, so
# each step page-faults and zeroes its whole working set again (README "Speed": the paper-geometry
# step takes 38-55 s so on the 2-core host, 34-38 s with this). jemalloc with dirty_decay_ms:-1
# keeps freed pages mapped and reuses them; the process keeps its peak memory until it exits,
# which a training step reaches again every step anyway. (glibc's own knobs, no mmap and no trim,
# leak with XLA's aligned allocations; glibc.malloc.hugetlb=1 saves 2 s, the zeroing stays.)
#
# The library: $CAER_JEMALLOC if set (a path, or "none" to run the command as it is), else
# libjemalloc.so.2 as the dynamic linker finds it (Debian/Ubuntu: apt-get install libjemalloc2).
# Without one the command runs unchanged after a note on stderr. An existing MALLOC_CONF wins.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 COMMAND ARGS..." >&2
  exit 2
fi

lib="${CAER_JEMALLOC:-}"
if [[ -z "$lib" ]]; then
  ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"
  # No ldconfig means no jemalloc. awk reads the whole listing: stopping at the match would kill
  # ldconfig with SIGPIPE once its listing outgrows the pipe buffer, and pipefail would then end
  # this script silently (seen in CI: one of two local.sh processes exited without a word).
  lib="$({ "$ldconfig" -p 2>/dev/null || true; } | awk '$1 == "libjemalloc.so.2" && !lib {lib = $NF} END {print lib}')"
  if [[ -z "$lib" ]]; then
    echo "with_jemalloc: libjemalloc.so.2 not found (apt-get install libjemalloc2); running with" \
      "the system malloc, slower on CPU" >&2
    exec "$@"
  fi
elif [[ "$lib" == none ]]; then
  exec "$@"
elif [[ ! -f "$lib" ]]; then
  echo "with_jemalloc: CAER_JEMALLOC=$lib: no such file" >&2
  exit 2
fi

export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
export MALLOC_CONF="${MALLOC_CONF:-dirty_decay_ms:-1,muzzy_decay_ms:-1}"
exec "$@"
