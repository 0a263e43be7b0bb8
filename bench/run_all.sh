#!/usr/bin/env bash
# Runs every benchmark and writes their JSON lines into one JSON file (default bench/results/all.json).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/all.json}"
mkdir -p "$(dirname "$out")"
py="${PYTHON:-.venv/bin/python}"
lines=()
for bench in sampler train_step rollout_scaling rollout_engine async_rl; do
  echo "running bench/${bench}.py" >&2
  lines+=("$("$py" "bench/${bench}.py" 2>/dev/null | tail -n 1)")
done
{
  echo "["
  for i in "${!lines[@]}"; do
    sep=","; [ "$i" -eq $((${#lines[@]} - 1)) ] && sep=""
    echo "  ${lines[$i]}${sep}"
  done
  echo "]"
} > "$out"
echo "wrote $out" >&2
