"""The continuous-batching engine's device side: its jitted programs over the slot arrays.

- prefill: prefills unique prompts and inserts their caches, first logits, PRNG keys and sampling
  parameters into free slots;
- decode: advances every active slot inside one `lax.while_loop`, returning early once enough
  slots have finished for a batched refill;
- take rows: the finished slots' tokens and log-probs, in one gather.

The host side (queue, slot ownership, refills, results) is `engine.Engine`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memagent_jax.engine_slots import cache_slots, slot_shardings, slots_cache
from memagent_jax.models.platform import cache_axes, per_layer_cache, slot_axis
from memagent_jax.models.sharding import DECODE_RULES, cache_sharding, constrain_cache
from memagent_jax.models.transformer import KVCache
from memagent_jax.sampler import _argmax, _prefill, filter_logits

_NEG = -1e30


@dataclasses.dataclass
class EngineStats:
    """Programs traced (prefill + decode) and host calls of each, for every engine."""

    compilations: int = 0
    prefill_calls: int = 0
    decode_calls: int = 0
    decode_steps: int = 0  # loop iterations run
    active_slot_steps: int = 0  # sum over iterations of active slots (occupancy numerator)
    slot_steps: int = 0  # iterations x slots (occupancy denominator)


STATS = EngineStats()


def compile_count() -> int:
    """How many engine programs have been traced in this process."""
    return STATS.compilations


def _sample_rows(logits: jax.Array, keys: jax.Array, step: jax.Array, s: dict[str, jax.Array],
                 vocab_limit: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sampler._sample_step` with per-row params and per-row steps (same ids and log-probs)."""
    temperature = s["temperature"]
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    vocab_ok = jnp.arange(logits.shape[-1])[None, :] < vocab_limit
    masked = jnp.where(vocab_ok, scaled, _NEG)
    filtering = (s["top_k"] > 0) | (s["top_p"] < 1.0)

    def sample(lg: jax.Array) -> jax.Array:
        step_keys = jax.vmap(jax.random.fold_in)(keys, step)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, lg.shape[-1:], jnp.float32))(step_keys)
        # Per row, sampler's filter (its cond becomes a select under vmap: rows with both
        # filters off keep their logits); the sort is skipped when no row filters.
        per_row = jax.vmap(lambda x, p, k: filter_logits(x[None], p, k)[0])
        filtered = jax.lax.cond(jnp.any(filtering),
                                lambda x: per_row(x, s["top_p"], s["top_k"]), lambda x: x, lg)
        return _argmax(filtered + noise)

    greedy_ids = _argmax(masked)
    ids = jax.lax.cond(jnp.all(greedy), lambda x: greedy_ids, sample, masked)
    ids = jnp.where(greedy, greedy_ids, ids)
    logps = jax.nn.log_softmax(scaled, axis=-1)
    return ids, jnp.take_along_axis(logps, ids[:, None], axis=-1)[:, 0]


def _constrain(slots: dict[str, jax.Array], mesh: Any) -> dict[str, jax.Array]:
    if mesh is None:
        return slots
    shardings = slot_shardings(slots, mesh)
    return {n: jax.lax.with_sharding_constraint(x, shardings[n]) for n, x in slots.items()}


def _prefill_program(graphdef: Any, state: Any, slots: dict[str, jax.Array], ids: jax.Array,
                     lens: jax.Array, row_to_unique: jax.Array, slot_idx: jax.Array,
                     new: dict[str, jax.Array], *, chunk: int, mesh: Any) -> dict[str, jax.Array]:
    """Prefills unique prompts [U, P] and inserts them into slots `slot_idx` [M] (out of range:
    a padding row, dropped). `new` holds the rows' keys and sampling parameters."""
    STATS.compilations += 1  # trace time only
    model = nnx.merge(graphdef, state)
    U, P = ids.shape
    per_layer = per_layer_cache()
    # the prompts' cache split like the slots' (else XLA may replicate it)
    cache = constrain_cache(KVCache.zeros(model.config, U, P, per_layer=per_layer), mesh)
    logits_u, cache = _prefill(model, ids, lens, cache, chunk)
    out = dict(slots)
    put = lambda a, v: a.at[slot_idx].set(v, mode="drop")  # noqa: E731
    specs = (None, None) if mesh is None else tuple(
        cache_sharding(mesh, DECODE_RULES, keys=keys, per_layer=per_layer) for keys in (True, False))

    def into_slots(slot_cache: jax.Array, prompts: jax.Array, axes: tuple[str, ...], layer: Any,
                   spec: Any) -> jax.Array:
        # the prompts' extent in every axis: their slots (P rounded up to the layout's multiple)
        at = ((slot_idx,) if layer is None else (layer, slot_idx)) + tuple(
            slice(0, n) for n in prompts.shape[1:])
        x = slot_cache.at[at].set(prompts[row_to_unique], mode="drop")
        return x if spec is None else jax.lax.with_sharding_constraint(x, spec)

    k_axes, v_axes = cache_axes()
    if per_layer:  # each layer's own arrays
        slot_cache = slots_cache(slots, model.config.num_layers)
        filled = KVCache(
            tuple(into_slots(a, c, k_axes, None, specs[0]) for a, c in zip(slot_cache.k, cache.k)),
            tuple(into_slots(a, c, v_axes, None, specs[1]) for a, c in zip(slot_cache.v, cache.v)))
        out.update(cache_slots(filled))
    else:
        def insert(layer: jax.Array, kv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            # one layer at a time: the rows gathered for the scatter into other devices' slots are
            # one layer's (all-gathered rows x prompt), not every layer's (7 GiB for Qwen2.5-7B at 64 rows)
            return (into_slots(kv[0], cache.k[layer], k_axes, layer, specs[0]),
                    into_slots(kv[1], cache.v[layer], v_axes, layer, specs[1]))

        out["k"], out["v"] = jax.lax.fori_loop(0, model.config.num_layers, insert, (slots["k"], slots["v"]))
    out["logits"] = put(slots["logits"], logits_u[row_to_unique])
    out["plen"] = put(slots["plen"], lens[row_to_unique])
    out["step"] = put(slots["step"], jnp.zeros_like(slot_idx))
    out["active"] = put(slots["active"], jnp.ones(slot_idx.shape, bool))
    for name, value in new.items():
        out[name] = put(slots[name], value)
    return _constrain(out, mesh)


def _decode_program(graphdef: Any, state: Any, slots: dict[str, jax.Array],
                    vocab_limit: jax.Array, refill_at: jax.Array, *, steps: int, mesh: Any,
                    read_len: int | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
    """Advances every active slot by up to `steps` tokens; returns the slots and the iterations
    run. Stops after the iteration in which the `refill_at`-th slot finishes (0: never early),
    so the host refills freed slots in batches rather than one program call per finished row.
    `read_len` (a per-layer cache): no active row reaches slot `read_len` in this call, so the
    steps run on the first `read_len` slots of each layer's cache, cut once and written back once
    (a step's attention then reads its layer's arrays whole, uncopied, only up to `read_len`)."""
    STATS.compilations += 1
    model = nnx.merge(graphdef, state)
    S, W = slots["tokens"].shape
    rows = jnp.arange(S)
    L = model.config.num_layers
    full = slots_cache(slots, L)
    # a per-layer cache's layers read their weights sliced once here, not at every step
    weights = model.layer_weights() if full.per_layer else None
    if read_len is not None and full.per_layer:
        # keys', values' (axis, slots per index)
        slot_axes = [slot_axis(axes[1:], x[0].shape) for axes, x in zip(cache_axes(), full)]

        def live_part(x: jax.Array, keys: bool) -> jax.Array:
            axis, per_index = slot_axes[0 if keys else 1]
            return jax.lax.slice_in_dim(x, 0, read_len // per_index, axis=axis)
        slots = dict(slots) | cache_slots(full.map(live_part))

    def cond(c: tuple[jax.Array, jax.Array, dict[str, jax.Array]]) -> jax.Array:
        i, finished, s = c
        return (i < steps) & ~((refill_at > 0) & (finished >= refill_at)) & jnp.any(s["active"])

    def body(c: tuple[jax.Array, jax.Array, dict[str, jax.Array]]
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        i, finished_count, s = c
        s = dict(s)
        active, step = s["active"], s["step"]
        ids, lp = _sample_rows(s["logits"], s["keys"], step, s, vocab_limit)
        ids = jnp.where(active, ids, 0)
        at = jnp.where(active, step, W)  # inactive rows write nowhere
        s["tokens"] = s["tokens"].at[rows, at].set(ids, mode="drop")
        s["logps"] = s["logps"].at[rows, at].set(lp, mode="drop")
        new_step = step + active.astype(jnp.int32)
        hit_stop = jnp.any(ids[:, None] == s["stop_ids"], axis=-1)
        finished = active & (hit_stop | (new_step >= s["max_new"]))
        hidden, cache = model.hidden_states(ids[:, None], cache=slots_cache(s, L),
                                            cache_index=s["plen"] + step, layer_weights=weights)
        s.update(cache_slots(cache))
        s["logits"] = model.logits(hidden)[:, 0]
        s["step"], s["active"] = new_step, active & ~finished
        occupancy = s.pop("occupancy") + jnp.sum(active.astype(jnp.int32))
        finished_count = finished_count + jnp.sum(finished.astype(jnp.int32))
        return i + 1, finished_count, dict(_constrain(s, mesh), occupancy=occupancy)

    slots = dict(slots, occupancy=jnp.int32(0))
    i, _, out = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), slots))
    occupancy = out.pop("occupancy")
    if read_len is not None and full.per_layer:  # the live part back into the whole cache
        cut = slots_cache(out, L)
        back = lambda whole, part, axis: jax.lax.dynamic_update_slice_in_dim(whole, part, 0, axis)  # noqa: E731
        out.update(cache_slots(KVCache(
            tuple(back(w, c, slot_axes[0][0]) for w, c in zip(full.k, cut.k)),
            tuple(back(w, c, slot_axes[1][0]) for w, c in zip(full.v, cut.v)))))
    return _constrain(out, mesh), jnp.stack([i, occupancy])


@jax.jit
def _take_rows(arrays: list[jax.Array], index: jax.Array) -> list[jax.Array]:
    """Rows `index` of each array (the finished slots' tokens and log-probs)."""
    return [jnp.take(x, index, axis=0) for x in arrays]


@functools.lru_cache(maxsize=64)
def _jitted_prefill(chunk: int, mesh: Any) -> Any:
    return jax.jit(functools.partial(_prefill_program, chunk=chunk, mesh=mesh), static_argnums=0,
                   donate_argnums=2)


@functools.lru_cache(maxsize=64)
def _jitted_decode(steps: int, mesh: Any, read_len: int | None = None) -> Any:
    return jax.jit(functools.partial(_decode_program, steps=steps, mesh=mesh, read_len=read_len),
                   static_argnums=0, donate_argnums=2)


# ------------------------------------------------------------------------------------ the engine
