#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (e.g. v5p-32 = 16 chips on 4 hosts): create or reuse the slice,
# install this repo on every worker, start `memagent-jax train` on all of them, stream the log.
# On TPU, jax.distributed.initialize() finds the other hosts by itself (distributed.auto=true).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh COMMAND [ARGS]

Commands:
  up                       create the TPU VM slice, or reuse it if it already exists
  setup                    copy this checkout (or git clone $REPO_URL) to every worker, pip install -e .
  train CONFIG [k=v ...]   start `memagent-jax train CONFIG distributed.auto=true k=v ...` on all
                           workers in the background, then stream worker 0's log (Ctrl-C stops
                           the streaming only)
  launch CONFIG [k=v ...]  up + setup + train
  logs [WORKER]            stream a worker's training log (default worker 0)
  status                   describe the slice and show whether training runs on each worker
  stop                     send SIGTERM to the training on every worker (it saves a checkpoint)
  delete                   delete the slice
  help                     this text

Environment (defaults in brackets):
  TPU_NAME [memagent-jax]     TPU_ZONE [us-east5-a]        TPU_TYPE [v5p-32]
  TPU_RUNTIME [v2-alpha-tpuv5] (the v5p software version; v5e: v2-alpha-tpuv5-lite)
  TPU_PROJECT [gcloud's default project]   TPU_SPOT [0] (1 = --spot)
  REPO_URL [empty: copy this checkout]     REPO_REF [main] (with REPO_URL)
  REMOTE_DIR [memagent-jax] (relative to the home directory on the workers)
  PIP_PACKAGES ["jax[tpu]"] (installed with the repo)
  RUN_LOG [memagent-train.log]  PID_FILE [memagent-train.pid] (relative paths: in the home directory)

Example:
  TPU_TYPE=v5p-32 launch/tpu_pod.sh launch qwen2_5_7b_memagent_v5p32 model.path=/mnt/models/Qwen2.5-7B-Instruct
Check the memory first: memagent-jax plan qwen2_5_7b_memagent_v5p32 --devices 16 --hbm-gib 95
USAGE
}

TPU_NAME="${TPU_NAME:-memagent-jax}"
TPU_ZONE="${TPU_ZONE:-us-east5-a}"
TPU_TYPE="${TPU_TYPE:-v5p-32}"
TPU_RUNTIME="${TPU_RUNTIME:-v2-alpha-tpuv5}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_SPOT="${TPU_SPOT:-0}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-memagent-jax}"
PIP_PACKAGES="${PIP_PACKAGES:-jax[tpu]}"
RUN_LOG="${RUN_LOG:-memagent-train.log}"
PID_FILE="${PID_FILE:-memagent-train.pid}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

common_args=(--zone "$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then
  common_args+=(--project "$TPU_PROJECT")
fi

tpu() {
  gcloud compute tpus tpu-vm "$@" "${common_args[@]}"
}

# Runs a shell command on every worker (or on the worker given as $2).
on_workers() {
  local command="$1" worker="${2:-all}"
  tpu ssh "$TPU_NAME" --worker="$worker" --command "$command"
}

# A path on the workers, quoted; relative paths are relative to the home directory.
remote_path() {
  if [[ "$1" == /* ]]; then
    quote "$1"
  else
    printf '%s' "\$HOME/$(quote "$1")"
  fi
}

quote() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

cmd_up() {
  if tpu describe "$TPU_NAME" >/dev/null 2>&1; then
    echo "reusing TPU slice $TPU_NAME in $TPU_ZONE"
    return 0
  fi
  local extra=()
  if [[ "$TPU_SPOT" == 1 ]]; then
    extra+=(--spot)
  fi
  echo "creating TPU slice $TPU_NAME ($TPU_TYPE, $TPU_RUNTIME) in $TPU_ZONE"
  tpu create "$TPU_NAME" --accelerator-type "$TPU_TYPE" --version "$TPU_RUNTIME" "${extra[@]}"
}

cmd_setup() {
  local dir
  dir="$(quote "$REMOTE_DIR")"
  if [[ -n "$REPO_URL" ]]; then
    on_workers "set -e; rm -rf $dir; git clone --branch $(quote "$REPO_REF") $(quote "$REPO_URL") $dir"
  else
    local tmp
    tmp="$(mktemp -d)"
    tar -czf "$tmp/memagent-jax.tar.gz" -C "$REPO_ROOT" --exclude=./.git --exclude=./.venv --exclude=./runs .
    tpu scp "$tmp/memagent-jax.tar.gz" "$TPU_NAME:memagent-jax.tar.gz" --worker=all
    rm -rf "$tmp"
    on_workers "set -e; rm -rf $dir; mkdir -p $dir; tar -xzf memagent-jax.tar.gz -C $dir; rm -f memagent-jax.tar.gz"
  fi
  local packages=()
  read -r -a packages <<<"$PIP_PACKAGES"  # a space-separated list; no globbing of "jax[tpu]"
  on_workers "set -e; python3 -m pip install --upgrade pip; python3 -m pip install -e $dir $(quote "${packages[@]}")"
}

cmd_train() {
  if [[ $# -lt 1 ]]; then
    echo "train needs a CONFIG" >&2
    usage >&2
    exit 2
  fi
  local run
  run="$(quote python3 -m memagent_jax train "$1" distributed.auto=true "${@:2}")"
  # setsid: the trainer leads its own process group, so `stop` can signal all of it.
  on_workers "cd $(quote "$REMOTE_DIR") && setsid nohup $run > $(remote_path "$RUN_LOG") 2>&1 < /dev/null & echo \$! > $(remote_path "$PID_FILE")"
  echo "training started on all workers of $TPU_NAME; streaming worker 0 (Ctrl-C stops streaming only)"
  cmd_logs 0
}

cmd_logs() {
  on_workers "tail -n 100 -F $(remote_path "$RUN_LOG")" "${1:-0}"
}

cmd_status() {
  tpu describe "$TPU_NAME" --format="value(state,acceleratorType,runtimeVersion)"
  on_workers "if [ -f $(remote_path "$PID_FILE") ] && kill -0 \"\$(cat $(remote_path "$PID_FILE"))\" 2>/dev/null; then echo \"\$(hostname): training\"; else echo \"\$(hostname): idle\"; fi"
}

cmd_stop() {
  on_workers "if [ -f $(remote_path "$PID_FILE") ]; then kill -TERM -- -\"\$(cat $(remote_path "$PID_FILE"))\" 2>/dev/null || true; rm -f $(remote_path "$PID_FILE"); fi"
}

cmd_delete() {
  tpu delete "$TPU_NAME" --quiet
}

if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
command="$1"
shift
case "$command" in
  up) cmd_up ;;
  setup) cmd_setup ;;
  train) cmd_train "$@" ;;
  launch) cmd_up; cmd_setup; cmd_train "$@" ;;
  logs) cmd_logs "$@" ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  help|-h|--help) usage ;;
  *) echo "unknown command '$command'" >&2; usage >&2; exit 2 ;;
esac
