#!/usr/bin/env bash
# One call on a lent GPU machine: environment check, then a phase's benchmarks in priority order.
# Each run gets what is left of the time budget (BUDGET_S, default 560 s) as its limit; raw JSON
# lines go to $OUT/results.jsonl, what ran (args, exit code, seconds) to $OUT/runs.txt, all
# stderr to $OUT/log.txt.
#
#   bench/gpu_session.sh 1        # phase 1: train step (+ torch peer), sampler at batch 1/64/16
#   bench/gpu_session.sh 2        # phase 2: train-step variants (remat, attention, batch, flags)
#
# If the image's flax/optax fail the smoke test, wheels under .whl/ (carried) are installed to
# /tmp/site and put on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
phase=${1:-1}
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
start=$(date +%s)
budget=${BUDGET_S:-560}
log=$OUT/log.txt
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONPATH=${PYTHONPATH:-}${PYTHONPATH:+:}$PWD
py=${PYTHON:-python3}

smoke() {
  "$py" - <<'EOF'
import jax, jax.numpy as jnp, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())
from memagent_jax.models import ModelConfig
from memagent_jax.models.transformer import init_model
from memagent_jax.rl.train_step import init_train_state, make_optimizer, make_apply_update
cfg = ModelConfig.from_hf_dict(dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, vocab_size=256, tie_word_embeddings=True,
    architectures=["Qwen2ForCausalLM"]))
m = init_model(cfg)
print("logits", m(jnp.zeros((2, 8), jnp.int32)).shape)
tx = make_optimizer(1e-5, 1, 1)
g, st = init_train_state(m, tx)
st, n, _ = make_apply_update(tx)(st, jax.tree.map(jnp.ones_like, st.params))
print("update ok", float(n))
EOF
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  "$py" -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"
if ! smoke 2>&1 | tee -a "$log"; then
  echo "smoke test failed with the image's packages: installing carried wheels" | tee -a "$log"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  smoke 2>&1 | tee -a "$log" || exit 1
fi
# cuDNN flash attention vs the XLA reference (GQA, bf16): relative error
"$py" - <<'EOF' 2>&1 | tee -a "$log"
import jax, jax.numpy as jnp
ks = jax.random.split(jax.random.key(1), 3)
q = jax.random.normal(ks[0], (2, 512, 14, 64), jnp.bfloat16)
k = jax.random.normal(ks[1], (2, 512, 2, 64), jnp.bfloat16)
v = jax.random.normal(ks[2], (2, 512, 2, 64), jnp.bfloat16)
ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True, implementation="xla")
try:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32)
    print("cudnn attention rel err", float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)))
except Exception as e:  # noqa: BLE001
    print("cudnn attention FAILED:", type(e).__name__, str(e)[:300])
EOF

run() {  # run NAME ARGS... : one benchmark with what is left of the budget as its limit
  local name=$1; shift
  local left=$(( budget - ($(date +%s) - start) ))
  if (( left < 45 )); then echo "SKIP $name ($left s left)" | tee -a "$log" "$OUT/runs.txt"; return; fi
  echo "=== $name: $*" | tee -a "$log"
  local t0; t0=$(date +%s)
  XLA_PYTHON_CLIENT_MEM_FRACTION=${FRAC:-$XLA_PYTHON_CLIENT_MEM_FRACTION} \
    timeout "$left" "$py" "$@" > "$OUT/cur.txt" 2>> "$log"
  local rc=$? line
  line=$(grep '^{' "$OUT/cur.txt" | tail -n 1)
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s :: $*" | tee -a "$log" >> "$OUT/runs.txt"
  if [ -n "$line" ]; then echo "$line" >> "$OUT/results.jsonl"; echo "$line"; fi
}

T="bench/train_step.py --preset qwen2.5-0.5b --dtype bfloat16 --peak-tflops 989 --repeats 5"
S="bench/sampler.py --preset qwen2.5-0.5b --hbm-gbps 3350"
case "$phase" in
  1)
    run train_b8_s2048_dots_xla_peer $T --batch 8 --seq 2048 --remat dots_no_batch --attn xla
    run train_b8_s2048_none_cudnn $T --batch 8 --seq 2048 --remat none --attn cudnn --no-peer --breakdown
    # both samplers live in one process: leave torch half of the GPU
    FRAC=0.5 run sampler_b1 $S --batch 1
    FRAC=0.5 run sampler_b64 $S --batch 64
    FRAC=0.5 run sampler_b16 $S --batch 16
    run train_b8_s2048_dots_xla_breakdown $T --batch 8 --seq 2048 --remat dots_no_batch --attn xla --no-peer --breakdown
    run train_b8_s2048_dots_cudnn $T --batch 8 --seq 2048 --remat dots_no_batch --attn cudnn --no-peer
    run train_b8_s2048_none_blocked $T --batch 8 --seq 2048 --remat none --attn blocked --no-peer
    run train_b8_s2048_full_xla $T --batch 8 --seq 2048 --remat full --attn xla --no-peer
    ;;
  2)
    # filled in from phase 1's results
    for spec in ${PHASE2_RUNS:-}; do
      IFS=, read -r name args <<< "$spec"
      # shellcheck disable=SC2086
      run "$name" $T ${args//:/ }
    done
    ;;
esac
rm -f "$OUT/cur.txt"
echo "done in $(( $(date +%s) - start )) s" | tee -a "$log"
cat "$OUT/runs.txt"
