"""The DAPO RL loop over multi-conversation memory rollouts.

One RL step:
  1. collect: sample generation batches (B documents x G members) with the current weights,
     score the final answers, drop zero-variance groups, and keep sampling with the SAME weights
     until `train_batch_size` groups are kept (bounded by `max_num_gen_batches`);
  2. advantages per trajectory (overlong shaping on the final answer's token length), broadcast
     to every conversation of the trajectory;
  3. old (and reference) log-probs with the training forward, unless one mini-batch and one
     epoch make the ratio exactly 1;
  4. mini-batches of rl.mini_batch_size whole groups (shuffled; every conversation of a group in
     the same one) -> token-budget micro-batches -> exact token-mean gradient accumulation ->
     one optax step per mini-batch;
  5. metrics, async orbax checkpoint every `save_every` steps and on SIGTERM/SIGINT.
Every random choice derives from (seed, RL step): generation batch b samples from the stream
`seeds.derive(trainer.seed, step, b)`, the update shuffles with numpy's SeedSequence of the same;
the data loader's position is saved, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax import sampler
from memagent_jax.agent.memory import make_policy
from memagent_jax.agent.prompts import builder_from_config
from memagent_jax.agent.rollout import RolloutResult, engine_generate_fn, rollout
from memagent_jax.agent.window import engine_max_len
from memagent_jax.checkpoint import RunCheckpointer, StopSignal
from memagent_jax.config import Config, save_config, turn_rows
from memagent_jax.distributed import (
    allgather_objects, global_array, global_max, mesh_processes, process_offsets, to_host,
)
from memagent_jax.metrics import MetricsWriter
from memagent_jax.models.lora import merged, zero_adapters
from memagent_jax.models.sharding import batch_multiple, batch_sharding, mesh_context
from memagent_jax.rl import rewards as R
from memagent_jax.rl.advantages import filter_groups, group_advantages, overlong_penalty
from memagent_jax.rl.batching import (
    global_denominator,
    group_mini_batches,
    micro_batch_arrays,
    pack_micro_batches,
)
from memagent_jax.rl.collect import Collected, ScoredBatch, assemble, merge_results
from memagent_jax.rl.loss import reduce_aux_sums
from memagent_jax.rl.train_step import (
    LAG_BUCKETS,
    LossSettings,
    accumulate,
    init_policy_state,
    make_apply_update,
    make_optimizer,
    merge_policy,
    micro_batch_grads,
    sequence_logprobs,
)
from memagent_jax.seeds import Seed, derive
from memagent_jax.types import SampleOutput, Trajectory

RewardFn = Callable[[Trajectory], tuple[float, float]]  # -> (reward, accuracy)


def default_reward_fn(kind: str) -> RewardFn:
    """'boxed': the training verifier (docs/reference.md section 4); 'sub_em': eval-style answer match."""
    if kind == "boxed":
        def boxed(t: Trajectory) -> tuple[float, float]:
            score = R.verify(t.answer_text, t.ground_truths)
            return score, score
        return boxed
    if kind == "sub_em":
        def sub(t: Trajectory) -> tuple[float, float]:
            pred = R.boxed_answer(t.answer_text) or R.answer_is_extract(t.answer_text) or ""
            score = R.sub_em(pred, t.ground_truths)
            return score, score
        return sub
    raise ValueError(f"unknown reward {kind!r}; expected boxed or sub_em")


#: What dynamic sampling filters groups on (rl.filter_metric): the reward function's accuracy or
#: its reward (before overlong shaping); a group whose metric has zero spread is dropped.
FILTER_METRICS = ("accuracy", "reward")


class DynamicSamplingError(RuntimeError):
    """Raised when max_num_gen_batches generation batches did not yield enough mixed groups."""


class Trainer:
    """Runs `cfg.trainer.total_steps` DAPO steps of the memory agent (see module docstring)."""

    def __init__(self, cfg: Config, model: Any, tokenizer: Any, data: Iterator[list[dict]], *,
                 mesh: jax.sharding.Mesh | None = None, reward_fn: RewardFn | None = None,
                 generate_fn: Callable[..., Any] | None = None,
                 data_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None):
        rl = cfg.rl
        if rl.train_batch_size % rl.mini_batch_size:
            raise ValueError(f"rl.train_batch_size={rl.train_batch_size} must be a multiple of "
                             f"rl.mini_batch_size={rl.mini_batch_size}")
        if not rl.filter_groups and rl.gen_batch_size != rl.train_batch_size:
            raise ValueError("without rl.filter_groups, rl.gen_batch_size must equal rl.train_batch_size")
        if rl.filter_metric not in FILTER_METRICS:
            raise ValueError(f"rl.filter_metric={rl.filter_metric!r}: dynamic sampling filters on "
                             f"one of {FILTER_METRICS}; set rl.filter_metric to one of them")
        self.cfg, self.tokenizer, self.data, self.mesh = cfg, tokenizer, data, mesh
        self.data_state = data_state
        self.reward_fn = reward_fn or default_reward_fn(rl.reward)
        self.out_dir = Path(cfg.trainer.out_dir)
        self.policy = make_policy(cfg.agent.policy, **self._policy_kwargs())
        self.builder = builder_from_config(tokenizer, cfg.agent)
        self._generate_fn = generate_fn
        self.num_minis = rl.train_batch_size // rl.mini_batch_size
        self.on_policy = self.num_minis == 1 and rl.ppo_epochs == 1
        self.tx = make_optimizer(cfg.optim.lr, cfg.optim.warmup_steps, self.num_minis * rl.ppo_epochs,
                                 b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps,
                                 weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip)
        # With LoRA the state holds the adapters only; `frozen` is the base (models/lora.py).
        self.graphdef, self.state, self.frozen = init_policy_state(model, self.tx, mesh)
        self.lora = getattr(model.config, "lora", None)
        self.ref_params = None
        if rl.kl_coef > 0:  # the reference: the initial policy; with LoRA the base (zero adapters)
            self.ref_params = (jax.tree.map(jnp.copy, self.state.params) if self.frozen is None
                               else zero_adapters(self.state.params))
        self.apply_update = make_apply_update(self.tx, jax.tree.map(lambda x: x.sharding, self.state))
        self.settings = LossSettings(
            eps_low=rl.eps_low, eps_high=rl.eps_high, clip_c=rl.clip_c if rl.clip_c > 0 else None,
            agg=rl.agg, kl_coef=rl.kl_coef, entropy_coef=rl.entropy_coef,
            temperature=cfg.rollout.temperature or 1.0, tis_cap=rl.tis_cap,
            tis_level=rl.tis_level, mis_cap=rl.mis_cap, mis_level=rl.mis_level,
            logprob_chunk=rl.logprob_chunk)
        self.rl_step = 0
        self.checkpointer = RunCheckpointer(self.out_dir / "checkpoints", keep=cfg.trainer.keep,
                                            async_save=cfg.trainer.async_checkpoint)
        self.metrics = MetricsWriter(self.out_dir)

    def _policy_kwargs(self) -> dict[str, Any]:
        a = self.cfg.agent
        if a.policy == "overwrite":
            base = dict(chunk_size=a.chunk_size, max_chunks=a.max_chunks,
                        max_memory_tokens=a.max_memory_tokens)
        else:
            base = {}
        return {**base, **a.policy_kwargs}

    # ------------------------------------------------------------------ the policy's sampler
    def model(self) -> Any:
        """The current policy as an NNX module (shares the train state's buffers; with LoRA, the
        frozen base with the adapters applied)."""
        return merge_policy(self.graphdef, self.state.params, self.frozen)

    def rollout_model(self) -> Any:
        """The policy the rollout samples from. With LoRA and model.lora.rollout: merged (the
        default) the adapters merged into the base (W + (alpha/rank) A @ B: new buffers for the
        adapted weights only, rebuilt each RL step), which decoded faster than applying them at
        every step (bench/lora_rollout.py); `applied` keeps the adapters (no copy of the weights)."""
        model = self.model()
        return merged(model) if self.cfg.model.lora.rollout == "merged" else model

    def generate_fn(self) -> Callable[..., Any]:
        """The rollout's generate function (rollout.engine's) with the current policy."""
        if self._generate_fn is not None:
            return self._generate_fn
        return self.make_generate_fn(self.rollout_model(), self.mesh)

    def make_generate_fn(self, model: Any, mesh: jax.sharding.Mesh | None) -> Callable[..., Any]:
        """rollout.engine's generate function sampling from `model` on `mesh` (the train mesh in
        sync mode, the rollout mesh in async mode)."""
        tok = self.tokenizer
        state = sampler.decode_state(model, mesh)
        r = self.cfg.rollout

        def generate_rows(prompts: list[list[int]], max_new_tokens: int, seed: Seed,
                          first_row: int | None = None, **kw: Any) -> Any:
            return sampler.generate(
                model, prompts, max_new_tokens=max_new_tokens, seed=seed, mesh=mesh, state=state,
                first_row=first_row,
                temperature=kw.get("temperature", r.temperature), top_p=kw.get("top_p", r.top_p),
                top_k=kw.get("top_k", r.top_k), eos_ids=tuple(tok.eos_ids), vocab_limit=tok.vocab_size)

        def generate(prompts: list[list[int]], *, max_new_tokens: int, seed: Seed, **kw: Any) -> Any:
            """All rows at once, or slices of rollout.max_rows_per_call rows (bounded KV cache).
            A slice's rows keep the keys of the whole call (the turn's seed, their row in it over
            all processes), so slicing bounds memory without changing what is sampled."""
            cap = r.max_rows_per_call
            if cap <= 0:
                return generate_rows(prompts, max_new_tokens, seed, **kw)
            if mesh_processes(mesh)[0] == 1:  # one process (or async RL's local rollout mesh)
                calls, start = -(-len(prompts) // cap), 0
            else:  # processes agree on the call count
                (calls,) = global_max(-(-len(prompts) // cap))
                start = int(process_offsets([len(prompts)])[0])
            outs = [generate_rows(prompts[i * cap:(i + 1) * cap], max_new_tokens, seed,
                                  first_row=start + i * cap, **kw) for i in range(calls)]
            return SampleOutput(tokens=[t for o in outs for t in o.tokens],
                                logps=[lp for o in outs for lp in o.logps],
                                finish_reasons=[f for o in outs for f in o.finish_reasons])

        if r.engine == "static":
            return generate
        if r.engine != "continuous":
            raise ValueError(f"rollout.engine={r.engine!r}: expected 'static' or 'continuous'")
        return engine_generate_fn(
            model, tok, slots=self._engine_slots(mesh), max_len=r.engine_max_len or self._engine_max_len(model),
            decode_steps=r.engine_decode_steps, prefill_rows=r.engine_prefill_rows,
            refill_batch=r.engine_refill_batch,
            static_fn=generate, mesh=mesh,
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)

    def _engine_slots(self, mesh: jax.sharding.Mesh | None = None) -> int:
        """The engine's slots on this process: rollout.max_rows_per_call (all processes together,
        as plan and compile count them) split over the processes."""
        procs = mesh_processes(mesh if mesh is not None else self.mesh)[0]
        return -(-turn_rows(self.cfg) // procs)

    def _engine_max_len(self, model: Any) -> int:
        """Cache positions per engine slot: the longest prompt the agent's budgets allow (template,
        question, memory, chunk) plus the longer reply, bucketed, within the model's window."""
        a = self.cfg.agent
        return engine_max_len(self.builder, model.config.max_position_embeddings,
                              question_budget=a.question_budget, memory_tokens=a.max_memory_tokens,
                              chunk_size=a.chunk_size, answer_tokens=a.max_final_new_tokens)

    # ------------------------------------------------------------------------------ collect
    @staticmethod
    def _sync_steps() -> Callable[[int], int] | None:
        if jax.process_count() == 1:
            return None
        return lambda n: global_max(n)[0]

    def generation_batch(self, generate: Callable[..., Any], docs: list[dict], seed: Seed, *,
                         local: bool = False) -> ScoredBatch:
        """One generation batch: the rollout of `docs` x group_size, scored, with the groups that
        dynamic sampling keeps (mixed groups under rl.filter_metric). Multi-host, every process
        then holds the whole batch; `local`: this process's documents only, no collective (async
        RL's rollout thread; its trainer gathers the processes' batches)."""
        a = self.cfg.agent
        res = rollout(docs, policy=self.policy, builder=self.builder, tokenizer=self.tokenizer,
                      generate_fn=generate, group_size=self.cfg.rollout.group_size, training=True,
                      gen_kwargs=dict(max_memory_new_tokens=a.max_memory_tokens,
                                      max_final_new_tokens=a.max_final_new_tokens, seed=seed),
                      question_budget=a.question_budget,
                      sync_steps=None if local else self._sync_steps())
        if jax.process_count() > 1 and not local:  # every process holds the whole generation batch
            res = merge_results(allgather_objects(res))
        return self.score(res)

    def score(self, res: RolloutResult) -> ScoredBatch:
        """Rewards, accuracies and dynamic sampling's keep mask of a rollout."""
        rl = self.cfg.rl
        scored = [self.reward_fn(t) for t in res.trajectories]
        for t, (r_i, a_i) in zip(res.trajectories, scored):
            t.reward, t.accuracy = float(r_i), float(a_i)
        reward = np.array([s[0] for s in scored], np.float32)
        acc = np.array([s[1] for s in scored], np.float32)
        groups = np.array([t.group_id for t in res.trajectories])
        metric = acc if rl.filter_metric == "accuracy" else reward
        keep = filter_groups(metric, groups) if rl.filter_groups else np.ones(len(groups), bool)
        return ScoredBatch(res, reward, acc, keep)

    def _too_many_batches(self, kept_groups: int, gen: int) -> DynamicSamplingError:
        rl = self.cfg.rl
        return DynamicSamplingError(
            f"dynamic sampling kept {kept_groups} of rl.train_batch_size={rl.train_batch_size} "
            f"groups after rl.max_num_gen_batches={rl.max_num_gen_batches} generation batches "
            "(the other groups were all-correct or all-wrong); raise rl.max_num_gen_batches "
            "(0 = unbounded), rl.gen_batch_size, or the group size")

    def collect(self) -> Collected:
        """Generation batches until train_batch_size mixed groups are kept (dynamic sampling)."""
        rl = self.cfg.rl
        generate = self.generate_fn()
        batches: list[ScoredBatch] = []
        kept_groups = 0
        while kept_groups < rl.train_batch_size:
            if rl.max_num_gen_batches and len(batches) >= rl.max_num_gen_batches:
                raise self._too_many_batches(kept_groups, len(batches))
            seed = derive(self.cfg.trainer.seed, self.rl_step, len(batches))  # this batch's stream
            batches.append(self.generation_batch(generate, next(self.data), seed))
            kept_groups += batches[-1].kept_groups
        return assemble(batches, rl.train_batch_size)

    # ------------------------------------------------------------------------------- update
    def _rows_on_device(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        return {k: global_array(v, batch_sharding(self.mesh, ndim=v.ndim)) for k, v in arrays.items()}

    def _logprob_pass(self, params: Any, batch: Any, lengths: np.ndarray) -> np.ndarray:
        out = np.zeros(batch.tokens.shape, np.float32)
        multiple = batch_multiple(self.mesh)
        for rows in pack_micro_batches(lengths, self.cfg.rl.micro_batch_tokens):
            arrays = micro_batch_arrays(batch, rows, lengths, multiple)
            lp = sequence_logprobs(self.graphdef, params, self._rows_on_device(
                {"tokens": arrays["tokens"]})["tokens"], temperature=self.settings.temperature,
                chunk=self.settings.logprob_chunk, frozen=self.frozen)
            lp = to_host(lp)[: len(rows)]
            width = min(lp.shape[1], out.shape[1])
            out[rows, :width] = lp[:, :width]
        return out

    def update(self, collected: Collected) -> dict[str, float]:
        """Advantages, old log-probs, mini-batch updates; returns metrics."""
        rl, ov = self.cfg.rl, self.cfg.rl.overlong
        merged = collected.batch
        trajs = merged.trajectories
        final_len = np.array([len(merged.conversations[t.conversation_ids[-1]].response) for t in trajs])
        shaped = collected.rewards.copy()
        if ov.enable:
            shaped += overlong_penalty(final_len, max_len=ov.max_len, cache_len=ov.cache_len,
                                       factor=ov.factor)
        groups = np.array([t.group_id for t in trajs])
        adv = group_advantages(shaped, groups, norm_std=rl.norm_adv_by_std, eps=rl.adv_eps)
        for t, a_i, r_i in zip(trajs, adv, shaped):
            t.advantage, t.reward = float(a_i), float(r_i)
        batch = merged.to_batch(adv)
        if rl.overlong_filter:
            truncated = np.array([c.finish_reason == "length" for c in merged.conversations])
            batch.response_mask[truncated] = 0.0
            batch.advantages[truncated] = 0.0
        lengths = np.array([len(c.prompt) + len(c.response) for c in merged.conversations])
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        extra: dict[str, np.ndarray] = {}
        if not self.on_policy:
            extra["old_logp"] = self._logprob_pass(self.state.params, batch, lengths)
        if self.ref_params is not None:
            extra["ref_logp"] = self._logprob_pass(self.ref_params, batch, lengths)
        extra.update(self.extra_token_arrays(merged, batch))
        timings["time/old_logp"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rng = np.random.default_rng([self.cfg.trainer.seed, self.rl_step, 7])
        sums: dict[str, float] = {}
        dens, norms, skipped = [], [], 0
        lag_sums: dict[str, float] = {}
        multiple = batch_multiple(self.mesh)
        dropping = self.lora is not None and self.lora.dropout > 0
        micro_index = 0
        for _ in range(rl.ppo_epochs):
            for mini in group_mini_batches(batch.group_ids, self.num_minis, rng):
                den = global_denominator(batch.response_mask[mini], rl.agg)
                acc_grads, mini_sums = None, None
                for rows in pack_micro_batches(lengths[mini], rl.micro_batch_tokens):
                    rows = mini[rows]
                    arrays = micro_batch_arrays(batch, rows, lengths, multiple, extra)
                    # the adapters' dropout masks: one stream per (RL step, micro-batch)
                    dropout_rng = (derive(self.cfg.trainer.seed, self.rl_step, 8, micro_index)
                                   if dropping else None)
                    micro_index += 1
                    grads, aux = micro_batch_grads(self.graphdef, self.state.params,
                                                   self._rows_on_device(arrays),
                                                   jnp.float32(max(den, 1e-8)), self.settings,
                                                   self.frozen, dropout_rng)
                    for k in [k for k in aux if k.startswith("lag_")]:  # per-lag sums: not means
                        lag_sums[k] = lag_sums.get(k, 0.0) + aux.pop(k)  # on device: no sync
                    acc_grads = grads if acc_grads is None else accumulate(acc_grads, grads)
                    mini_sums = aux if mini_sums is None else jax.tree.map(jnp.add, mini_sums, aux)
                self.state, norm, skip = self.apply_update(self.state, acc_grads)
                means = jax.device_get(reduce_aux_sums(mini_sums, jnp.float32(max(den, 1e-8))))
                gap = float(mini_sums["logp_gap"]) / max(float(mini_sums["num_tokens"]), 1.0)
                for k, v in {**means, "logp_gap": gap}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                dens.append(den)
                norms.append(float(norm))
                skipped += int(skip)
        timings["time/update"] = time.perf_counter() - t0
        n_updates = len(norms)
        out = {f"actor/{k}": v / n_updates for k, v in sums.items()}
        out.update({"actor/grad_norm": float(np.mean(norms)), "actor/skipped_updates": skipped,
                    "adv/mean": float(adv.mean()), "adv/std": float(adv.std()),
                    "adv/max": float(adv.max()), "adv/min": float(adv.min()),
                    "reward/shaped_mean": float(shaped.mean()),
                    "response/final_length_mean": float(final_len.mean()),
                    "batch/conversations": len(lengths), "batch/trajectories": len(trajs),
                    "batch/tokens": int(lengths.sum()), **timings})
        for j in range(LAG_BUCKETS):  # async: mean |sampler - trainer| log-prob per version lag
            tokens = float(lag_sums.get(f"lag_tokens_{j}", 0.0))
            if tokens > 0:
                name = f"async/rollout_logprob_abs_diff_lag{j}" + ("+" if j == LAG_BUCKETS - 1 else "")
                out[name] = float(lag_sums[f"lag_gap_{j}"]) / tokens
        return out

    def extra_token_arrays(self, merged: RolloutResult, batch: Any) -> dict[str, np.ndarray]:
        """Per-token arrays [N, T] the loss reads beside the batch's (none in sync mode)."""
        return {}

    # -------------------------------------------------------------------------------- loop
    def save(self, force: bool = False) -> None:
        meta = {"rl_step": self.rl_step,
                "data_state": self.data_state[0]() if self.data_state else None}
        self.checkpointer.save(self.rl_step, self.state, meta, force=force)

    def maybe_resume(self) -> bool:
        if self.checkpointer.latest_step() is None:
            return False
        self.state, meta = self.checkpointer.restore(self.state)
        self.rl_step = int(meta["rl_step"])
        if self.data_state and meta.get("data_state") is not None:
            self.data_state[1](meta["data_state"])
        self.metrics.truncate_after(self.rl_step)
        return True

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        with mesh_context(self.mesh):  # activations keep their batch sharding (sharding.py)
            collected = self.collect()
            t_rollout = time.perf_counter() - t0
            metrics = self.update(collected)
        metrics.update(self._step_metrics(collected, t_rollout, time.perf_counter() - t0))
        self.rl_step += 1
        return metrics

    def _step_metrics(self, collected: Collected, t_rollout: float, t_step: float) -> dict[str, Any]:
        """The step's rollout, reward and timing metrics (beside the update's)."""
        s = collected.rollout_stats
        return {
            "reward/mean": float(collected.rewards.mean()),
            "accuracy/all_mean": float(collected.accuracy.mean()),
            "dynamic/gen_batches": collected.gen_batches,
            "dynamic/groups_seen": collected.groups_seen,
            "dynamic/groups_kept": self.cfg.rl.train_batch_size,
            "rollout/memory_capped": s.get("memory_capped", 0),
            "rollout/truncated_final": s.get("finish_length_final", 0),
            "rollout/truncated_memory": s.get("finish_length_memory", 0),
            "rollout/truncation_rate": s.get("truncation_rate", 0.0),
            "response/memory_length_mean": s.get("mean_memory_response_length", 0.0),
            "response/length_mean": s.get("mean_response_length", 0.0),
            "time/rollout": t_rollout, "time/step": t_step,
            "sampler/compilations": sampler.compile_count(),
        }

    def run(self, progress: bool | None = None) -> str:
        """Trains to total_steps (resuming if a checkpoint exists). Returns "done" | "interrupted"."""
        if jax.process_index() == 0:  # changed settings: the earlier config is kept beside it
            save_config(self.cfg, self.out_dir / "config.yaml", keep_previous=True)
        self.maybe_resume()
        total = self.cfg.trainer.total_steps
        bar = _progress(progress if progress is not None else self.cfg.trainer.progress,
                        total, self.rl_step)
        status = "done"
        with StopSignal() as stop:
            while self.rl_step < total:
                metrics = self.train_step()
                self.metrics.write(self.rl_step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                                    acc=f"{metrics['accuracy/all_mean']:.3f}")
                if stop.requested:
                    self.save(force=True)
                    status = "interrupted"
                    break
                if self.rl_step % self.cfg.trainer.save_every == 0 or self.rl_step == total:
                    self.save()
        self.checkpointer.wait()
        if bar is not None:
            bar.close()
        return status

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


def _progress(enabled: bool, total: int, start: int) -> Any:
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="RL steps", unit="step")
