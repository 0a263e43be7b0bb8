"""Continuous-batching generation engine: a fixed set of decode slots that requests flow through.

The engine keeps a KV cache of `slots` rows x `max_len` positions on the device. Two jitted
programs act on it (a prefill/insert + generate split, as in JetStream):

- prefill: prefills a batch of waiting requests (identical prompts once: group sharing) and
  inserts their caches, first logits, PRNG keys and sampling parameters into free slots;
- decode: advances every active slot for up to `decode_steps` tokens inside one
  `lax.while_loop`, returning early once `refill_batch` slots have finished while requests
  are waiting (an eighth of the slots by default: one refill per finished row made host work,
  not decoding, most of a rollout's time). On a per-layer cache (CPU, one process) a call runs
  on each layer's cache cut to the slots it can reach (`Engine._read_len`).

The programs are in engine_programs.py; this module is the host side. Between programs the host
frees finished rows, refills their slots and dispatches the next decode call before it hands the
finished rows to the caller, whose work on them (the next turn's prompt) then overlaps the
device's. Each request samples
from its own PRNG stream fold_in(row_key, its own step), with per-request temperature / top-p /
top-k / stop ids / max_new_tokens as traced values, so its tokens and log-probs do not depend on
the slot it ran in or on its neighbours: the output equals `sampler.generate`'s for the same
prompts and seeds (up to float rounding of differently shaped matmuls).

Multi-host (a mesh over several processes): the slot arrays are global, split over the
processes along the batch axis, and each process owns its contiguous share of the slots: it
queues its own requests, fills only its own slots and reads back only its own rows (from its
addressable shards). Every process joins every program call: before each call the processes
exchange a few integers (requests waiting, slots busy, the prefill shapes) with one tiny
all-gather, so they agree on whether to prefill, on its shapes, on stopping early and on when
all work is done.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.distributed import allgather_ints, from_process_local, mesh_processes, process_offsets
from memagent_jax.models.attention import live_read_lengths
from memagent_jax.engine_programs import (  # noqa: F401  (STATS, compile_count, the programs: public here)
    STATS, EngineStats, _jitted_decode, _jitted_prefill, _take_rows, compile_count,
)
from memagent_jax.models.sharding import DECODE_RULES, batch_multiple, batch_sharding, mesh_context
from memagent_jax.models.platform import cache_length, mesh_platform, slot_multiple
from memagent_jax.models.transformer import Decoder
from memagent_jax.sampler import MAX_STOP_IDS, _pow2_bucket, bucket, decode_state
from memagent_jax.seeds import Seed, derive
from memagent_jax.engine_slots import slot_shardings, slot_specs
from memagent_jax.types import SampleOutput


def row_key(seed: Seed, row: int) -> np.ndarray:
    """The PRNG key `sampler.generate` gives row `row` of a call with `seed` (`row` counts rows
    over all processes of the call, in process order)."""
    return derive(seed, row)


@dataclasses.dataclass
class Request:
    """One prompt to complete. `key` is the row's PRNG key (`row_key(seed, row)`)."""

    prompt: Sequence[int]
    max_new_tokens: int
    key: Any
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: Sequence[int] = ()

    def __post_init__(self) -> None:  # as the static sampler checks them: never a silent greedy
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclasses.dataclass
class Result:
    """A finished request: generated ids (stop id included), their log-probs, why it stopped."""

    request_id: int
    tokens: list[int]
    logps: list[float]
    finish_reason: str  # "eos" | "length"


# ------------------------------------------------------------------------------ device programs
class Engine:
    """Continuous batching over `slots` (rounded up to a power of two) cache rows of `max_len`.

    `submit` queues a request and returns its id; `run()` yields `Result`s as requests finish
    (more requests may be submitted while iterating). Ids >= `vocab_limit` are never sampled.
    On a `mesh` (one process), slots are split over the decode batch axes (their count rounded
    up to a multiple of the batch shards) and weights laid out by the decode rules.
    Programs compiled: one decode program per (slots, max_len, decode_steps, and on a per-layer
    cache the read length: one of `live_read_lengths(max_len)`) and one prefill program per
    (batch bucket, unique-prompt bucket, prompt-length bucket).
    On a mesh over several processes, `slots` is per process (see the module docstring).
    """

    def __init__(self, model: Decoder, *, slots: int = 16, max_len: int = 1024,
                 decode_steps: int = 32, prefill_chunk: int = 512, vocab_limit: int | None = None,
                 share_prefill: bool = True, state: tuple[Any, Any] | None = None,
                 prefill_rows: int = 0, refill_batch: int = 0,
                 mesh: jax.sharding.Mesh | None = None) -> None:
        cfg = model.config
        if max_len < 2 or max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} must be in [2, max_position_embeddings="
                             f"{cfg.max_position_embeddings}]")
        self.model, self.config = model, cfg
        self.mesh = mesh
        self.procs, self.rank = mesh_processes(mesh)  # (1, 0) for a mesh of this process only
        per_process = max(1, batch_multiple(mesh, DECODE_RULES) // self.procs)
        self.local_slots = _pow2_bucket(max(1, slots), per_process)  # the slots this process fills
        self.first_slot = self.rank * self.local_slots
        self.num_slots = self.local_slots * self.procs
        self.max_len, self.decode_steps = int(max_len), int(decode_steps)
        self.prefill_chunk, self.share_prefill = int(prefill_chunk), share_prefill
        # requests prefilled per program call (0 = every free slot at once); bounds the prefill's
        # activations, which grow with rows x prompt length
        self.prefill_rows = int(prefill_rows) // self.procs if prefill_rows else self.local_slots
        # finished slots (all processes) after which a decode call returns while requests wait
        # (0: an eighth of the slots): fewer, larger refills; each call costs host work
        self.refill_batch = int(refill_batch) or max(1, self.num_slots // 8)
        self.vocab_limit = np.int32(vocab_limit or cfg.vocab_size)
        self.graphdef, self.state = state if state is not None else decode_state(model, mesh)
        self._queue: collections.deque[tuple[int, Request]] = collections.deque()
        self._slot_owner: list[int | None] = [None] * self.local_slots  # local slot -> request id
        self._live = np.zeros((self.local_slots,), np.int64)  # each slot's cache length so far
        self._requests: dict[int, Request] = {}
        self._next_id = 0
        self._counts = dict(prefill_calls=0, decode_calls=0, decode_steps=0, active_slot_steps=0,
                            device_wait_s=0.0, caller_s=0.0, run_s=0.0)
        self.dispatched_calls = 0  # decode calls dispatched (`stats()`' decode_calls: read back)
        self._running_since: float | None = None  # run()'s start while it runs
        self._slots = self._empty_slots()

    def _empty_slots(self) -> dict[str, jax.Array]:
        specs = slot_specs(self.config, self.num_slots, self.max_len, mesh_platform(self.mesh))
        if self.mesh is None:
            return {n: jnp.zeros(shape, dt) for n, (shape, dt) in specs.items()}
        shardings = slot_shardings(specs, self.mesh)
        return jax.jit(lambda: {n: jnp.zeros(shape, dt) for n, (shape, dt) in specs.items()},
                       out_shardings=shardings)()

    def submit(self, request: Request) -> int:
        """Queues a request (validated now); returns its id."""
        n = len(request.prompt)
        if n == 0:
            raise ValueError("engine.submit: the prompt is empty: it needs at least one token")
        if request.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {request.max_new_tokens}")
        if n + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceed the engine's max_len={self.max_len}; raise max_len "
                             "(rollout.engine_max_len in a training config)")
        if len(request.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(request.stop_ids)}")
        rid = self._next_id
        self._next_id += 1
        self._queue.append((rid, request))
        return rid

    @property
    def pending(self) -> int:
        """This process's requests queued or in a slot."""
        return len(self._queue) + sum(o is not None for o in self._slot_owner)

    def _plan_refill(self) -> tuple[list[tuple[int, Request]], list[list[int]], list[int], list[int]]:
        """The queued requests that fit the free slots: (batch, unique prompts, row -> unique
        prompt, free local slots)."""
        free = [i for i, o in enumerate(self._slot_owner) if o is None]
        batch = [self._queue.popleft()
                 for _ in range(min(len(free), len(self._queue), max(1, self.prefill_rows)))]
        prompts = [list(map(int, r.prompt)) for _, r in batch]
        if self.share_prefill:
            unique: dict[tuple[int, ...], int] = {}
            row_to_unique = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
            unique_prompts = [list(p) for p in unique]
        else:
            row_to_unique, unique_prompts = list(range(len(prompts))), prompts
        return batch, unique_prompts, row_to_unique, free

    def _agree(self, plan: tuple, unyielded: int) -> tuple[int, int, int, int, int, int]:
        """(rows to prefill, unique prompts, longest prompt, requests still queued after this
        prefill, requests pending, results not yet yielded), each the maximum over processes:
        one tiny all-gather per engine call when multi-host."""
        batch, unique_prompts, _, _ = plan
        local = (len(batch), len(unique_prompts), max((len(p) for p in unique_prompts), default=0),
                 len(self._queue), self.pending + len(batch), unyielded)
        if self.procs == 1:
            return local
        return tuple(int(v) for v in allgather_ints(local).max(axis=0))

    def _refill(self, plan: tuple, rows_max: int, unique_max: int, longest: int) -> None:
        """Prefills the planned requests into their free slots in one program call (every process
        joins it with the agreed shapes; a process with nothing to prefill sends padding rows)."""
        batch, unique_prompts, row_to_unique, free = plan
        if rows_max == 0:
            return
        multiple = max(1, batch_multiple(self.mesh, DECODE_RULES) // self.procs) if self.procs > 1 else 1
        M, U = _pow2_bucket(rows_max, multiple), _pow2_bucket(max(1, unique_max), multiple)
        P = min(bucket(longest), self.max_len)
        chunk = min(self.prefill_chunk, P)
        if P % chunk:
            P = min(-(-P // chunk) * chunk, self.max_len)
            chunk = chunk if P % chunk == 0 else P
        ids = np.zeros((U, P), np.int32)
        lens = np.ones((U,), np.int32)
        for i, p in enumerate(unique_prompts):
            ids[i, : len(p)], lens[i] = p, len(p)
        first_unique = self.rank * U
        rows = np.zeros((M,), np.int32) + first_unique
        rows[: len(batch)] += np.asarray(row_to_unique, np.int32)
        slot_idx = np.full((M,), self.num_slots, np.int32)  # padding rows: dropped
        new = dict(keys=np.zeros((M, 2), np.uint32), temperature=np.zeros((M,), np.float32),
                   top_p=np.ones((M,), np.float32), top_k=np.zeros((M,), np.int32),
                   max_new=np.ones((M,), np.int32),
                   stop_ids=np.full((M, MAX_STOP_IDS), -1, np.int32))
        for j, (rid, r) in enumerate(batch):
            slot = free[j]
            self._slot_owner[slot] = rid
            self._live[slot] = len(r.prompt)
            slot_idx[j] = self.first_slot + slot
            new["keys"][j] = np.asarray(r.key, np.uint32).reshape(2)
            new["temperature"][j], new["top_p"][j], new["top_k"][j] = r.temperature, r.top_p, r.top_k
            new["max_new"][j] = r.max_new_tokens
            new["stop_ids"][j, : len(r.stop_ids)] = list(r.stop_ids)
        self._requests.update({rid: r for rid, r in batch})
        STATS.prefill_calls += 1
        self._counts["prefill_calls"] += 1
        args: list[Any] = [ids, lens, rows, slot_idx, new]
        if self.procs > 1:  # every process's rows, concatenated along the batch axis
            args = jax.tree.map(lambda a: from_process_local(a, batch_sharding(self.mesh, DECODE_RULES, a.ndim)),
                                args)
        with mesh_context(self.mesh):
            self._slots = _jitted_prefill(chunk, self.mesh)(self.graphdef, self.state, self._slots, *args)

    def _local_rows(self, names: Sequence[str], slots: Sequence[int] | None = None) -> list[np.ndarray]:
        """This process's rows of the slot arrays `names` (local slot order), or the given local
        slots: one device-to-host transfer for all of them with one process."""
        if self.procs == 1:
            arrays = [self._slots[n] for n in names]
            if slots is None:
                return [np.asarray(x) for x in jax.device_get(arrays)]
            # one jitted gather (indices padded to a power of two: few programs), not eager
            # indexing, whose ~10 dispatched primitives per array were most of a call's host work
            index = np.zeros((_pow2_bucket(len(slots)),), np.int32)
            index[: len(slots)] = slots
            picked = jax.device_get(_take_rows(arrays, index))
            return [np.asarray(x)[: len(slots)] for x in picked]
        outs = []
        lo, hi = self.first_slot, self.first_slot + self.local_slots
        for name in names:
            x = self._slots[name]
            out = np.zeros((self.local_slots, *x.shape[1:]), x.dtype)
            for shard in x.addressable_shards:
                rows = shard.index[0]
                start, stop = rows.start or 0, rows.stop if rows.stop is not None else x.shape[0]
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    out[a - lo:b - lo] = np.asarray(shard.data)[a - start:b - start]
            outs.append(out if slots is None else out[np.asarray(slots)])
        return outs

    def _collect(self) -> list[Result]:
        """Frees the slots whose request finished; returns their results."""
        active, step = self._local_rows(("active", "step"))
        for s, owner in enumerate(self._slot_owner):  # prompt + tokens so far (a new slot: step 0)
            if owner is not None:
                self._live[s] = len(self._requests[owner].prompt) + int(step[s])
        done = [s for s, o in enumerate(self._slot_owner) if o is not None and not active[s]]
        if not done:
            return []
        tokens, logps = self._local_rows(("tokens", "logps"), done)
        results = []
        for j, s in enumerate(done):
            rid = self._slot_owner[s]
            n = int(step[s])
            row = tokens[j, :n].tolist()
            stops = set(int(e) for e in self._requests.pop(rid).stop_ids)
            results.append(Result(rid, row, logps[j, :n].tolist(),
                                  "eos" if row and row[-1] in stops else "length"))
            self._slot_owner[s] = None
        return results

    def stats(self) -> dict[str, Any]:
        """This engine's program calls, decode iterations, slot occupancy (active / slots) and
        the wall time of `run()` (`run_s`) split three ways: `device_wait_s`, blocked on a decode
        call's result; `caller_s`, handed over to the caller at its results (its work overlaps
        the running call); `host_s`, the engine's own host work (refills, reads, bookkeeping)."""
        c = dict(self._counts)
        if self._running_since is not None:  # read while run() is under way
            c["run_s"] += time.perf_counter() - self._running_since
        host = c["run_s"] - c["device_wait_s"] - c["caller_s"]
        return dict(c, host_s=host, slots=self.num_slots, max_len=self.max_len,
                    occupancy=c["active_slot_steps"] / max(1, c["decode_steps"] * self.num_slots))

    def _hand_over(self, results: list[Result]) -> Iterator[Result]:
        """Yields `results`, counting the time the caller holds each (`caller_s`)."""
        for res in results:
            paused = time.perf_counter()
            yield res
            self._counts["caller_s"] += time.perf_counter() - paused

    def _read_len(self) -> int | None:
        """The cache slots the next decode call can reach, rounded up to `live_read_lengths`
        (one program per length), for a per-layer cache on one process; None: the whole cache.
        Every occupied slot's length so far plus the call's `decode_steps` bounds it."""
        if self.procs > 1 or "k" in self._slots:
            return None
        occupied = [self._live[s] for s, o in enumerate(self._slot_owner) if o is not None]
        need = max(occupied, default=0) + self.decode_steps
        platform = mesh_platform(self.mesh)
        multiple = slot_multiple(self.config.head_dim, platform)  # whole key tiles
        cache_len = cache_length(self.config.head_dim, self.max_len, platform)  # the slot arrays' length
        length = next((n for n in live_read_lengths(cache_len, multiple=max(16, multiple))
                       if n >= need), cache_len)
        return None if length >= cache_len else length

    def run(self) -> Iterator[Result]:
        """Yields results as requests finish, until nothing is queued or running (multi-host:
        on any process; a process with no work left still joins every call).

        A call's results are yielded while the next call runs: once a decode call returns, the
        engine frees the finished slots, refills them from the queue and dispatches the next
        call before handing the results over, so the caller's work on them (the next turn's
        prompt, its `submit`) overlaps the device's instead of idling it. Requests submitted
        then join the queue for the call after."""
        self._running_since = time.perf_counter()
        try:
            yield from self._run()
        finally:  # also when the caller stops early
            self._counts["run_s"] += time.perf_counter() - self._running_since
            self._running_since = None

    def _run(self) -> Iterator[Result]:
        results: list[Result] = []  # the last call's, yielded while the next one runs
        while True:
            plan = self._plan_refill()
            rows_max, unique_max, longest, queued, pending_max, unyielded = self._agree(plan, len(results))
            if pending_max == 0:  # nothing queued or in a slot on any process
                if unyielded == 0:
                    return
                yield from self._hand_over(results)  # the caller may submit more
                results = []
                continue
            self._refill(plan, rows_max, unique_max, longest)
            # with requests waiting, return once enough slots are free to refill in one batch
            refill_at = np.int32(min(queued, self.refill_batch))
            STATS.decode_calls += 1
            self.dispatched_calls += 1
            with mesh_context(self.mesh):
                self._slots, info = _jitted_decode(self.decode_steps, self.mesh, self._read_len())(
                    self.graphdef, self.state, self._slots, self.vocab_limit, refill_at)
            yield from self._hand_over(results)  # while the call runs
            waited = time.perf_counter()
            iters, occupied = (int(x) for x in np.asarray(info.addressable_data(0)))  # replicated
            self._counts["device_wait_s"] += time.perf_counter() - waited
            STATS.decode_steps += iters
            STATS.active_slot_steps += occupied
            STATS.slot_steps += iters * self.num_slots
            for name, n in (("decode_calls", 1), ("decode_steps", iters), ("active_slot_steps", occupied)):
                self._counts[name] += n
            results = self._collect()


def engine_generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Sequence[int] = (),
    seed: Seed = 0,
    vocab_limit: int | None = None,
    slots: int | None = None,
    decode_steps: int = 32,
    prefill_chunk: int = 512,
    share_prefill: bool = True,
    state: tuple[Any, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> SampleOutput:
    """`sampler.generate`'s contract on the engine: row r samples from `row_key(seed, r)` (r global
    over the processes of a mesh), so the output equals `sampler.generate(model, prompts, ...)`
    for the same arguments."""
    if len(prompts) == 0:
        raise ValueError("engine_generate() got no prompts: pass a non-empty list of token-id lists")
    longest = max(len(p) for p in prompts)
    max_len = min(bucket(longest + max_new_tokens), model.config.max_position_embeddings)
    engine = Engine(model, slots=slots or min(len(prompts), 32), max_len=max_len,
                    decode_steps=decode_steps, prefill_chunk=prefill_chunk,
                    vocab_limit=vocab_limit, share_prefill=share_prefill, state=state, mesh=mesh)
    first = int(process_offsets([len(prompts)])[0]) if engine.procs > 1 else 0
    ids = [engine.submit(Request(p, max_new_tokens, row_key(seed, first + r), temperature, top_p,
                                 top_k, tuple(eos_ids))) for r, p in enumerate(prompts)]
    done = {res.request_id: res for res in engine.run()}
    rows = [done[i] for i in ids]
    return SampleOutput(tokens=[r.tokens for r in rows], logps=[r.logps for r in rows],
                        finish_reasons=[r.finish_reason for r in rows])
