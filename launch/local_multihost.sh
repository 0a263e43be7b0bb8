#!/usr/bin/env bash
# N local CPU processes as one multi-process JAX job: jax.distributed over 127.0.0.1 with the gloo
# CPU collectives. Exercises the multi-host code paths (sharded init, checkpoints, metrics from
# process 0) on one machine. Exits non-zero if any process fails.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local_multihost.sh [options] CONFIG [key=value ...]

Runs `python -m memagent_jax train CONFIG key=value ...` in N local processes that form one
jax.distributed job (coordinator 127.0.0.1:PORT, gloo CPU collectives).

Options:
  -n N      number of processes (default 2)
  -d D      simulated CPU devices per process (default 4)
  -p PORT   coordinator port (default 12355, or $PORT)
  -l DIR    directory for the per-process logs (default runs/local_multihost_logs)
  -h        this help

Environment: PYTHON (default python), XLA_FLAGS (appended to the device-count flag).
Example: launch/local_multihost.sh -n 2 -d 4 tiny trainer.total_steps=2
USAGE
}

num_processes=2
devices_per_process=4
port="${PORT:-12355}"
log_dir="runs/local_multihost_logs"
while getopts ":n:d:p:l:h" opt; do
  case "$opt" in
    n) num_processes="$OPTARG" ;;
    d) devices_per_process="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    :) echo "option -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
for value in "$num_processes" "$devices_per_process" "$port"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "expected a positive integer, got '$value'" >&2
    exit 2
  fi
done
config="$1"
shift
python_bin="${PYTHON:-python}"
mkdir -p "$log_dir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'cleanup; exit 130' INT TERM

echo "starting $num_processes processes x $devices_per_process CPU devices, coordinator 127.0.0.1:$port"
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process ${XLA_FLAGS:-}" \
    "$python_bin" -m memagent_jax train "$config" \
      "distributed.coordinator_address=127.0.0.1:$port" \
      "distributed.num_processes=$num_processes" \
      "distributed.process_id=$i" \
      "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
  echo "  process $i: pid ${pids[$i]}, log $log_dir/process_$i.log"
done

# Poll so that the first failure stops the others (they would wait on collectives forever).
status=0
remaining=$num_processes
declare -A finished=()
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    if [[ -n "${finished[$i]:-}" ]] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    finished[$i]=1
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      echo "process $i failed with exit code $rc; last lines of $log_dir/process_$i.log:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2 || true
      status=1
      cleanup
    fi
  done
  if ((remaining > 0)); then
    sleep 1
  fi
done
if ((status == 0)); then
  echo "all $num_processes processes finished; logs in $log_dir"
fi
exit "$status"
