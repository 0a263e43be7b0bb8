#!/usr/bin/env bash
#SBATCH --job-name=memagent-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
# Multi-node GPU training under SLURM: one JAX process per node (default) or per GPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: sbatch [sbatch options] launch/gpu_slurm.sh [--per-gpu] [--port PORT] CONFIG [key=value ...]

Starts `memagent-jax train CONFIG distributed.coordinator_address=HOST:PORT
distributed.num_processes=$SLURM_NTASKS distributed.process_id=$SLURM_PROCID key=value ...`
with srun on every allocated node. The coordinator is the first node of $SLURM_JOB_NODELIST.

  --per-gpu     one process per GPU (srun --ntasks-per-node=GPUS, CUDA_VISIBLE_DEVICES=local id)
                instead of one process per node that drives all its GPUs
  --port PORT   coordinator port (default: 20000 + job id mod 20000, or $MASTER_PORT)

Examples:
  sbatch --nodes=1 launch/gpu_slurm.sh qwen2_5_7b_memagent model.path=/models/Qwen2.5-7B-Instruct
  sbatch --nodes=2 launch/gpu_slurm.sh qwen2_5_14b_memagent model.path=/models/Qwen2.5-14B-Instruct

Environment: MEMAGENT_JAX (the command, default memagent-jax; e.g. /path/.venv/bin/memagent-jax),
XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92: `memagent-jax plan` budgets 90% of HBM).
Check the memory first: memagent-jax plan CONFIG --devices N --hbm-gib 80
USAGE
}

per_gpu=0
port="${MASTER_PORT:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --per-gpu) per_gpu=1; shift ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "not inside a SLURM job: submit with sbatch (see --help)" >&2
  exit 2
fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
num_nodes="${#nodes[@]}"
coordinator="${nodes[0]}"
port="${port:-$((20000 + SLURM_JOB_ID % 20000))}"

gpus_per_node="${SLURM_GPUS_ON_NODE:-}"
if [[ -z "$gpus_per_node" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
  gpus_per_node="${SLURM_GPUS_PER_NODE##*:}"  # "8" or "h100:8"
fi
if [[ -z "$gpus_per_node" ]]; then
  gpus_per_node="$(nvidia-smi --list-gpus | wc -l)"
fi
if [[ "$per_gpu" == 1 ]]; then
  tasks_per_node="$gpus_per_node"
else
  tasks_per_node=1
fi
num_tasks=$((num_nodes * tasks_per_node))

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export MEMAGENT_JAX="${MEMAGENT_JAX:-memagent-jax}"
export MEMAGENT_COORDINATOR="$coordinator:$port"
export MEMAGENT_PER_GPU="$per_gpu"

echo "job $SLURM_JOB_ID: $num_nodes node(s) x $gpus_per_node GPU(s), $num_tasks process(es), coordinator $MEMAGENT_COORDINATOR"

# Runs once per task; SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS are the task's own.
read -r -d '' task_script <<'TASK' || true
set -euo pipefail
if [[ "$MEMAGENT_PER_GPU" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"
fi
config="$1"
shift
exec "$MEMAGENT_JAX" train "$config" \
  "distributed.coordinator_address=$MEMAGENT_COORDINATOR" \
  "distributed.num_processes=$SLURM_NTASKS" \
  "distributed.process_id=$SLURM_PROCID" \
  "$@"
TASK

srun --nodes="$num_nodes" --ntasks="$num_tasks" --ntasks-per-node="$tasks_per_node" \
  --kill-on-bad-exit=1 bash -c "$task_script" memagent-task "$@"
