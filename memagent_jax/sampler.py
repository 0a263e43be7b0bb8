"""Batched generation: chunked prefill, then a decode loop inside one jitted `lax.while_loop`.

One compiled program per (row bucket, unique-prompt bucket, prompt-length bucket, new-token
bucket): sampling parameters (temperature, top-p, top-k, max_new_tokens, stop ids) are traced
values, so a long RL run compiles a bounded, counted number of programs. The KV cache and the
sampling state are created inside the program and updated in place by the while loop; nothing
returns to the host until every row has finished.

Log-probs are the full-vocabulary fp32 log-softmax of logits / T at the sampled id (greedy: T=1),
exactly what the trainer recomputes with the same forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memagent_jax.models.sharding import (
    mesh_context,
    DECODE_RULES,
    batch_multiple,
    batch_sharding,
    constrain_cache,
    param_shardings,
)
from memagent_jax.cpu_threefry import unroll_on_cpu
from memagent_jax.distributed import allgather_ints, from_process_local, mesh_processes, to_host
from memagent_jax.models.attention import resolve as resolve_attention
from memagent_jax.models.platform import per_layer_cache
from memagent_jax.models.transformer import Decoder, KVCache
from memagent_jax.seeds import Seed, as_key
from memagent_jax.types import SampleOutput

MAX_STOP_IDS = 8
_NEG = -1e30
unroll_on_cpu()  # each sampled step's noise without rolled loops on CPU (cpu_threefry.py)


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest size >= n from {minimum * 2^k} U {minimum * 1.5 * 2^k} (<= 50% padding)."""
    size = minimum
    while size < n:
        if size * 3 // 2 >= n and (size * 3 // 2) % minimum == 0:
            return size * 3 // 2
        size *= 2
    return size


def _pow2_bucket(n: int, minimum: int = 1) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass
class SamplerStats:
    """Compilations so far (one per distinct program shape) and calls."""

    compilations: int = 0
    calls: int = 0
    shapes: set = dataclasses.field(default_factory=set)


STATS = SamplerStats()


def compile_count() -> int:
    """How many sampler programs have been traced in this process."""
    return STATS.compilations


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Masks logits [B, V] outside the top-k ids and outside the top-p nucleus (traced k, p).

    top_k <= 0 disables top-k; top_p >= 1 disables top-p. The sort is skipped when both are off.
    """

    def apply(lg: jax.Array) -> jax.Array:
        order = jnp.argsort(-lg, axis=-1)
        sorted_lg = jnp.take_along_axis(lg, order, axis=-1)
        rank = jnp.arange(lg.shape[-1])[None, :]
        keep = jnp.where(top_k > 0, rank < top_k, True)
        probs = jax.nn.softmax(jnp.where(keep, sorted_lg, _NEG), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better ids
        keep = keep & ((before < top_p) | (rank == 0))
        inverse = jnp.argsort(order, axis=-1)
        return jnp.where(jnp.take_along_axis(keep, inverse, axis=-1), lg, _NEG)

    return jax.lax.cond((top_k > 0) | (top_p < 1.0), apply, lambda lg: lg, logits)


def _argmax(x: jax.Array) -> jax.Array:
    """int32 index of the first maximum over the last axis (jnp.argmax semantics without NaNs).

    Two plain reductions: XLA:CPU runs argmax's variadic reduce with a fused producer (the Gumbel
    noise add, the vocab mask) ~3.5x slower (Gumbel-max over 16 x 4096 on 2 cores: 1.75 ms vs
    0.48 ms, a sixth of a small model's decode step).
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def _sample_step(logits: jax.Array, keys: jax.Array, step: jax.Array, params: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    """One token per row from fp32 logits [B, V]; returns (ids, full-vocab log-probs of ids)."""
    temperature = params["temperature"]
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    vocab_ok = jnp.arange(logits.shape[-1])[None, :] < params["vocab_limit"]
    masked = jnp.where(vocab_ok, scaled, _NEG)

    def sample(lg: jax.Array) -> jax.Array:  # Gumbel-max over the top-k / top-p survivors
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, lg.shape[-1:], jnp.float32))(step_keys)
        return _argmax(filter_logits(lg, params["top_p"], params["top_k"]) + noise)

    ids = jax.lax.cond(greedy, _argmax, sample, masked)  # greedy draws no noise
    logps = jax.nn.log_softmax(scaled, axis=-1)
    return ids, jnp.take_along_axis(logps, ids[:, None], axis=-1)[:, 0]


def _prefill(model: Decoder, ids: jax.Array, lens: jax.Array, cache: KVCache, chunk: int
             ) -> tuple[jax.Array, KVCache]:
    """Writes the prompts into the cache in chunks of `chunk` tokens (bounded attention memory);
    returns fp32 logits at each row's last prompt token [U, V] and the cache. With a kernel
    (model.attention resolving to cudnn, splash or blocked) the prompt goes in one piece: the
    kernel's causal attention over the new tokens is the prefill's, in O(P) memory (cudnn,
    splash) or one query block of <= 512 rows at a time (blocked)."""
    U, P = ids.shape
    from_start = resolve_attention(model.config.attention, dtype=model.config.dtype) != "xla"
    if from_start:
        chunk = P
    n_chunks = P // chunk
    last = jnp.zeros((U, model.config.hidden_size), jnp.dtype(model.config.dtype))

    def body(c: jax.Array, carry: tuple[jax.Array, KVCache]) -> tuple[jax.Array, KVCache]:
        last, cache = carry
        start = c * chunk
        piece = jax.lax.dynamic_slice_in_dim(ids, start, chunk, axis=1)
        local = lens - 1 - start
        here = (local >= 0) & (local < chunk)
        hidden, cache = model.hidden_states(piece, cache=cache, cache_index=jnp.full((U,), start),
                                            from_start=from_start, last_index=jnp.clip(local, 0, chunk - 1))
        return jnp.where(here[:, None], hidden[:, 0], last), cache

    if n_chunks == 1:
        last, cache = body(jnp.int32(0), (last, cache))
    else:
        last, cache = jax.lax.fori_loop(0, n_chunks, body, (last, cache))
    return model.logits(last), cache


def _program(graphdef: Any, state: Any, prompt_ids: jax.Array, prompt_lens: jax.Array,
             row_to_unique: jax.Array, row_keys: jax.Array, row_valid: jax.Array,
             params: dict[str, jax.Array], *, max_new_bucket: int, prefill_chunk: int,
             rows_are_unique: bool, mesh: Any) -> tuple[jax.Array, ...]:
    """The whole generation for one batch: prefill unique prompts, share, decode until done.
    `rows_are_unique`: row r is unique prompt r (no prompt shared), so no row copies a cache."""
    STATS.compilations += 1  # runs at trace time only: counts compiled programs
    model = nnx.merge(graphdef, state)
    cfg = model.config
    U, P = prompt_ids.shape
    B = row_to_unique.shape[0]
    S = P + max_new_bucket

    def constrain(x: jax.Array, sharding: Any) -> jax.Array:
        return x if mesh is None else jax.lax.with_sharding_constraint(x, sharding)

    per_layer = per_layer_cache()

    cache = constrain_cache(KVCache.zeros(cfg, U, S, per_layer=per_layer), mesh)
    logits_u, cache = _prefill(model, prompt_ids, prompt_lens, cache, prefill_chunk)
    row_spec = None if mesh is None else batch_sharding(mesh, DECODE_RULES, 2)
    if not rows_are_unique:  # rows share prompts: each row's copy of its prompt's cache
        cache = constrain_cache(cache.map(lambda x, keys: x[row_to_unique] if per_layer
                                          else x[:, row_to_unique]), mesh)
    logits = constrain(logits_u[row_to_unique], row_spec)
    lens = prompt_lens[row_to_unique]
    stop_ids = params["stop_ids"]
    max_new = params["max_new_tokens"]
    weights = model.layer_weights() if per_layer else None  # sliced once, read by every step

    init = dict(
        step=jnp.int32(0), cache=cache, logits=logits,
        tokens=jnp.zeros((B, max_new_bucket), jnp.int32),
        logps=jnp.zeros((B, max_new_bucket), jnp.float32),
        done=row_valid == 0,  # padding rows start finished
        length=jnp.zeros((B,), jnp.int32),
    )

    def cond(s: dict[str, Any]) -> jax.Array:
        return (s["step"] < max_new) & ~jnp.all(s["done"])

    def body(s: dict[str, Any]) -> dict[str, Any]:
        step = s["step"]
        ids, lp = _sample_step(s["logits"], row_keys, step, params)
        active = ~s["done"]
        ids = jnp.where(active, ids, 0)
        tokens = jax.lax.dynamic_update_index_in_dim(s["tokens"], ids, step, axis=1)
        logps = jax.lax.dynamic_update_index_in_dim(s["logps"], jnp.where(active, lp, 0.0), step, 1)
        length = s["length"] + active.astype(jnp.int32)
        hit_stop = jnp.any(ids[:, None] == stop_ids[None, :], axis=-1)
        done = s["done"] | (active & hit_stop) | (length >= max_new)
        hidden, cache = model.hidden_states(ids[:, None], cache=s["cache"], cache_index=lens + step,
                                            layer_weights=weights)
        return dict(step=step + 1, cache=cache, logits=model.logits(hidden)[:, 0], tokens=tokens,
                    logps=logps, done=done, length=length)

    out = jax.lax.while_loop(cond, body, init)
    return out["tokens"], out["logps"], out["length"]


@functools.lru_cache(maxsize=64)
def _compiled(graphdef: Any, max_new_bucket: int, prefill_chunk: int, rows_are_unique: bool,
              mesh: Any) -> Any:
    fn = functools.partial(_program, max_new_bucket=max_new_bucket, prefill_chunk=prefill_chunk,
                           rows_are_unique=rows_are_unique, mesh=mesh)
    return jax.jit(fn, static_argnums=0)


def _validate(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, max_prompt_len: int) -> None:
    if len(prompts) == 0:
        raise ValueError("generate() got no prompts: pass a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(p) > max_prompt_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, more than max_prompt_len={max_prompt_len}; "
                "shorten it or raise max_prompt_len (bounded by the model's position range)"
            )
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def decode_state(model: Decoder, mesh: jax.sharding.Mesh | None, *, cast: bool = True) -> tuple[Any, Any]:
    """(graphdef, state) with weights laid out by the decode rules on `mesh` (no-op if already)
    and, with `cast`, floating weights cast ONCE to the compute dtype (`config.dtype`): with fp32
    masters and bf16 compute every decode step then reads bf16 weights. The model casts each
    weight to the compute dtype where it uses it, so the cast changes no result, only bytes read."""
    graphdef, state = nnx.split(model)
    compute = jnp.dtype(model.config.dtype)

    def lower(x: jax.Array) -> jax.Array:
        return x.astype(compute) if cast and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != compute else x

    flat = nnx.to_flat_state(state)
    needs_cast = cast and any(jnp.issubdtype(v.get_value().dtype, jnp.floating) and v.get_value().dtype != compute
                              for _, v in flat)
    if mesh is not None:
        shardings = param_shardings(model.config, mesh, DECODE_RULES)
        state = nnx.from_flat_state({p: jax.device_put(lower(v.get_value()), shardings["/".join(map(str, p))])
                                     for p, v in flat})
    elif needs_cast:
        state = nnx.from_flat_state({p: lower(v.get_value()) for p, v in flat})
    return graphdef, state


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Sequence[int] = (),
    seed: Seed = 0,
    mesh: jax.sharding.Mesh | None = None,
    vocab_limit: int | None = None,
    max_prompt_len: int | None = None,
    share_prefill: bool = True,
    prefill_chunk: int = 512,
    state: tuple[Any, Any] | None = None,
    first_row: int | None = None,
) -> SampleOutput:
    """Generates up to `max_new_tokens` for each prompt (lists of token ids).

    temperature 0 = greedy. top_k 0 and top_p 1 are off. Row r samples from its own PRNG stream
    `seeds.derive(seed, r)` (`seed` an int or a derived key), so equal seeds give equal outputs.
    On a mesh over several processes r counts rows over all processes in process order: the call
    equals one process's call with every process's prompts laid end to end. `first_row` sets this
    process's first r instead (a caller that splits one call into slices passes each slice's start
    in the whole call, so its rows keep their keys). Identical prompts are
    prefilled once and their cache copied (`share_prefill`). Ids >= `vocab_limit` (the tokenizer's
    vocab) are never sampled. `state` may pass a precomputed `decode_state(model, mesh)` to skip the re-layout.
    """
    cfg = model.config
    max_prompt_len = max_prompt_len or cfg.max_position_embeddings
    # Multi-host: every process calls with its own rows (possibly none) and joins one program.
    procs, rank = mesh_processes(mesh)  # a mesh of this process's devices only: no collective
    if procs == 1 or prompts:
        _validate(prompts, max_new_tokens, temperature, top_p, top_k, max_prompt_len)
    prompts = [list(map(int, p)) for p in prompts]
    if len(eos_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(eos_ids)}")

    # Group sharing: one prefill per distinct prompt.
    if share_prefill:
        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        unique_prompts = [list(p) for p in unique]
    else:
        row_to_unique, unique_prompts = list(range(len(prompts))), prompts

    # Shapes (bucketed; agreed across processes): rows B and unique prompts U per process.
    longest = max((len(p) for p in unique_prompts), default=1)
    n_rows, n_unique = len(prompts), len(unique_prompts)
    key_offset = 0  # global index of this process's first row (the rows of lower processes)
    if procs > 1:
        counts = allgather_ints((n_rows, n_unique, longest, max_new_tokens))
        key_offset = int(counts[:rank, 0].sum())
        n_rows, n_unique, longest, max_new_tokens = (int(v) for v in counts.max(axis=0))
        if n_rows == 0:
            return SampleOutput(tokens=[], logps=[], finish_reasons=[])
    key_offset = key_offset if first_row is None else int(first_row)
    multiple = max(1, batch_multiple(mesh, DECODE_RULES) // procs)
    B = _pow2_bucket(n_rows, multiple)
    U = _pow2_bucket(n_unique, multiple)
    P = bucket(longest)
    chunk = min(prefill_chunk, P)
    P = -(-P // chunk) * chunk
    N = _pow2_bucket(max_new_tokens, 16)
    first_row, first_unique = rank * B, rank * U  # 0 if one process

    ids = np.zeros((U, P), np.int32)
    lens = np.ones((U,), np.int32)
    for i, p in enumerate(unique_prompts):
        ids[i, : len(p)] = p
        lens[i] = len(p)
    rows = np.zeros((B,), np.int32) + first_unique
    rows[: len(prompts)] += row_to_unique
    # one process whose rows are its unique prompts in order (the padding rows, finished from the
    # start, then read the padding prompts' caches): the cache is used as prefilled
    rows_are_unique = procs == 1 and U == B and row_to_unique == list(range(len(prompts)))
    row_valid = np.zeros((B,), np.int32)
    row_valid[: len(prompts)] = 1
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[: len(eos_ids)] = list(eos_ids)
    base = as_key(seed)
    keys = np.asarray(jax.vmap(lambda r: jax.random.fold_in(base, r))(np.arange(B) + key_offset))
    params = dict(
        temperature=np.float32(temperature), top_p=np.float32(top_p), top_k=np.int32(top_k),
        vocab_limit=np.int32(vocab_limit or cfg.vocab_size), stop_ids=stops,
        max_new_tokens=np.int32(max_new_tokens),
    )
    graphdef, st = state if state is not None else decode_state(model, mesh)
    args = [ids, lens, rows, keys, row_valid]
    if mesh is not None:
        args = [from_process_local(a, batch_sharding(mesh, DECODE_RULES, a.ndim)) for a in args]
    STATS.calls += 1
    STATS.shapes.add((B, U, P, N))
    with mesh_context(mesh):
        tokens, logps, length = _compiled(graphdef, N, chunk, rows_are_unique, mesh)(
            graphdef, st, *args, params)
    tokens, logps, length = (to_host(x)[first_row:first_row + B] for x in (tokens, logps, length))

    stop_set = set(int(e) for e in eos_ids)
    out_tokens, out_logps, reasons = [], [], []
    for r in range(len(prompts)):
        n = int(length[r])
        row = tokens[r, :n].tolist()
        out_tokens.append(row)
        out_logps.append(logps[r, :n].tolist())
        reasons.append("eos" if row and row[-1] in stop_set else "length")
    return SampleOutput(tokens=out_tokens, logps=out_logps, finish_reasons=reasons)
