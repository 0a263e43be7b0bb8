"""The continuous-batching engine against `sampler.generate`: same tokens, log-probs and finish
reasons for ragged batches with mixed max_new_tokens (greedy and sampled), with more requests
than slots so slots are refilled; bounded compile count; bad requests fail clearly."""

from __future__ import annotations

import time

import numpy as np
import pytest

from memagent_jax import engine as eng
from memagent_jax import sampler
from tiny_policy import tiny_model


def _prompts(seed: int, lengths: list[int], vocab: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=64)


def _reference(model, prompts, max_news, **kw):
    """sampler.generate row by row bucket: row r of a call with `seed` uses key (seed, r), so
    each distinct max_new_tokens gets its own call with the original row index kept."""
    out = [None] * len(prompts)
    for n in sorted(set(max_news)):
        rows = [r for r, m in enumerate(max_news) if m == n]
        # Fill the rows before r with dummies so row r keeps its index (and PRNG key).
        padded = [prompts[r] if max_news[r] == n else [1] for r in range(max(rows) + 1)]
        ref = sampler.generate(model, padded, max_new_tokens=n, **kw)
        for r in rows:
            out[r] = (ref.tokens[r], ref.logps[r], ref.finish_reasons[r])
    return out


def _run_engine(model, prompts, max_news, *, slots, seed, temperature=0.0, top_p=1.0, top_k=0,
                eos_ids=(), decode_steps=8, refill_batch=0):
    engine = eng.Engine(model, slots=slots, max_len=96, decode_steps=decode_steps,
                        refill_batch=refill_batch)
    ids = [engine.submit(eng.Request(p, m, eng.row_key(seed, r), temperature, top_p, top_k,
                                     tuple(eos_ids)))
           for r, (p, m) in enumerate(zip(prompts, max_news))]
    done = {res.request_id: res for res in engine.run()}
    return [(done[i].tokens, done[i].logps, done[i].finish_reason) for i in ids], engine


def _assert_same(got, ref):
    for (t, lp, fin), (rt, rlp, rfin) in zip(got, ref, strict=True):
        assert t == rt and fin == rfin
        np.testing.assert_allclose(lp, rlp, atol=1e-5)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.7, top_k=5),
])
def test_engine_equals_sampler_ragged_mixed_lengths_refilled_slots(model, sampling):
    lengths = [5, 17, 9, 30, 3, 12, 22, 7, 14, 1]
    max_news = [12, 3, 20, 7, 16, 1, 9, 20, 5, 11]
    prompts = _prompts(0, lengths)
    eos = (7, 11)
    got, engine = _run_engine(model, prompts, max_news, slots=4, seed=3, eos_ids=eos, **sampling)
    ref = _reference(model, prompts, max_news, seed=3, eos_ids=eos, **sampling)
    _assert_same(got, ref)
    assert all(o is None for o in engine._slot_owner) and not engine._queue
    reasons = {fin for _, _, fin in got}
    if sampling["temperature"] > 0 and not sampling.get("top_k"):
        assert reasons == {"eos", "length"}  # both kinds of finish exercised


def test_decode_reads_only_the_slots_a_call_can_reach(model, monkeypatch):
    """On a per-layer cache (CPU) each decode call runs on each layer's cache cut to the longest
    occupied slot plus the call's steps (rounded up to live_read_lengths), growing as the rows
    do; the outputs stay the sampler's."""
    cuts = []
    bound = eng.Engine._read_len
    monkeypatch.setattr(eng.Engine, "_read_len", lambda self: cuts.append(bound(self)) or cuts[-1])
    prompts, max_news = _prompts(11, [5, 40, 9, 3]), [6, 30, 12, 20]
    got, _ = _run_engine(model, prompts, max_news, slots=2, seed=2, temperature=1.0)
    _assert_same(got, _reference(model, prompts, max_news, seed=2, temperature=1.0))
    assert cuts[0] == 48  # the 40-token prompt + 8 steps, of a 96-slot cache (head_dim 16: keys untiled)
    assert len(set(cuts)) > 1 and all(c is None or c < 96 for c in cuts), cuts


def test_refill_batch_changes_the_calls_not_the_outputs(model):
    """A decode call returns once `refill_batch` slots finished (while requests wait): larger
    batches mean fewer, larger refills; every request's tokens stay the sampler's."""
    prompts = _prompts(4, [6, 11, 4, 19, 8, 13, 2, 9, 15, 7, 10, 5, 12, 3, 16, 6])
    max_news = [3, 14, 6, 2, 18, 5, 9, 1, 12, 4, 16, 7, 2, 11, 8, 13]
    ref = _reference(model, prompts, max_news, seed=5, temperature=1.0)
    calls = {}
    for batch in (1, 4):
        got, engine = _run_engine(model, prompts, max_news, slots=8, seed=5, temperature=1.0,
                                  decode_steps=16, refill_batch=batch)
        _assert_same(got, ref)
        calls[batch] = engine.stats()["prefill_calls"]
        stats = engine.stats()
        assert engine.refill_batch == batch and stats["device_wait_s"] > 0 and stats["host_s"] > 0
    assert calls[4] < calls[1], calls
    assert eng.Engine(model, slots=16, max_len=96).refill_batch == 2  # default: an eighth


def test_engine_generate_matches_generate_with_group_sharing(model):
    group = _prompts(4, [13])[0]
    prompts = [group] * 6 + _prompts(5, [9, 21, 4])
    kw = dict(max_new_tokens=14, temperature=1.0, top_p=0.9, eos_ids=(5,), seed=5)
    ref = sampler.generate(model, prompts, **kw)
    for slots in (3, 16):
        out = eng.engine_generate(model, prompts, slots=slots, decode_steps=4, **kw)
        assert out.tokens == ref.tokens and out.finish_reasons == ref.finish_reasons
        for a, b in zip(out.logps, ref.logps):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert len({tuple(t) for t in out.tokens[:6]}) > 1  # group members sample differently


def test_mixed_sampling_params_in_one_engine(model):
    """Greedy and sampled requests side by side: each equals its own sampler run."""
    prompts = _prompts(6, [8, 15, 4, 11, 6])
    settings = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.7),
                dict(temperature=1.2, top_k=3), dict(temperature=0.0)]
    engine = eng.Engine(model, slots=2, max_len=64, decode_steps=5)
    ids = [engine.submit(eng.Request(p, 10, eng.row_key(9, r), **s))
           for r, (p, s) in enumerate(zip(prompts, settings))]
    done = {res.request_id: res for res in engine.run()}
    for r, (p, s) in enumerate(zip(prompts, settings)):
        padded = [[1]] * r + [p]
        ref = sampler.generate(model, padded, max_new_tokens=10, seed=9, **s)
        assert done[ids[r]].tokens == ref.tokens[r]
        np.testing.assert_allclose(done[ids[r]].logps, ref.logps[r], atol=1e-5)


def test_compile_count_bounded_across_many_calls(model):
    rng = np.random.default_rng(7)
    eng.engine_generate(model, _prompts(1, [10, 12, 14]), max_new_tokens=5, temperature=1.0,
                        slots=4)
    before = eng.compile_count()
    for i in range(6):  # same buckets: prompts <= 16, prompt + new <= 32, <= 4 slots
        lengths = rng.integers(1, 15, size=int(rng.integers(1, 5))).tolist()
        eng.engine_generate(model, _prompts(10 + i, lengths), max_new_tokens=int(rng.integers(1, 16)),
                            temperature=float(rng.uniform(0, 1.5)), top_p=float(rng.uniform(0.5, 1)),
                            top_k=int(rng.integers(0, 5)), seed=i, slots=4)
    # Prefill programs: one per (batch, unique, length) bucket <= 3 x 3 x 1; decode: one.
    assert eng.compile_count() - before <= 9


def test_submit_can_interleave_with_run(model):
    """A request submitted while iterating (as the rollout does) runs and matches the sampler."""
    engine = eng.Engine(model, slots=2, max_len=64, decode_steps=4)
    first = _prompts(11, [6, 9])
    for r, p in enumerate(first):
        engine.submit(eng.Request(p, 6, eng.row_key(0, r)))
    results, extra, follow_up = [], None, None
    for res in engine.run():
        results.append(res)
        if extra is None:  # a follow-up turn queued the moment the first request finishes
            follow_up = first[res.request_id] + res.tokens
            extra = engine.submit(eng.Request(follow_up, 5, eng.row_key(0, 0)))
    by_id = {r.request_id: r for r in results}
    assert set(by_id) == {0, 1, extra}
    ref = sampler.generate(model, [follow_up], max_new_tokens=5)
    assert by_id[extra].tokens == ref.tokens[0]


def test_results_are_handed_over_while_the_next_call_runs(model):
    """While requests wait for slots, a call's results reach the caller after the next decode
    call was dispatched (its refill included): the caller's work overlaps the device's."""
    prompts = _prompts(12, [5, 8, 3, 9, 6, 4, 7, 10])
    max_news = [2, 9, 3, 12, 4, 6, 2, 8]
    engine = eng.Engine(model, slots=2, max_len=96, decode_steps=4, refill_batch=1)
    ids = [engine.submit(eng.Request(p, m, eng.row_key(3, r), 1.0))
           for r, (p, m) in enumerate(zip(prompts, max_news))]
    in_flight, done = [], {}
    for res in engine.run():
        # calls dispatched minus calls whose results were read: 1 = the next call is running
        midway = engine.stats()
        in_flight.append(engine.dispatched_calls - midway["decode_calls"])
        assert midway["run_s"] > 0 and midway["host_s"] >= 0  # the split holds while run() runs
        done[res.request_id] = res
        time.sleep(0.01)  # the caller's work on a result: counted as caller_s, not host_s
    stats = engine.stats()
    assert stats["caller_s"] >= 0.01 * len(prompts) and stats["host_s"] > 0  # host_s: compiles too
    assert in_flight[0] == 1 and set(in_flight) <= {0, 1}, in_flight
    assert in_flight.count(1) >= len(prompts) - 2  # all but the last calls' results overlap
    ref = _reference(model, prompts, max_news, seed=3, temperature=1.0)
    _assert_same([(done[i].tokens, done[i].logps, done[i].finish_reason) for i in ids], ref)


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=[]), "empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=[1] * 60, max_new_tokens=10), "max_len"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(stop_ids=list(range(9))), "stop ids"),
])
def test_bad_request_is_a_clear_error(model, bad, match):
    engine = eng.Engine(model, slots=2, max_len=64)
    kwargs = dict(prompt=[1, 2, 3], max_new_tokens=4, key=eng.row_key(0, 0))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        engine.submit(eng.Request(**kwargs))


@pytest.mark.slow  # ~25 s; test_trainer_collect_on_engine_equals_static covers engine == static in the default run
def test_rollout_on_engine_equals_static_rollout():
    """Same trajectories, memories, answers and conversations (tokens, log-probs) with no barrier
    between turns, ragged chunk counts and more trajectories than slots."""
    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
    from memagent_jax.agent.rollout import engine_generate_fn, rollout, sampler_generate_fn
    from tiny_policy import AsciiTokenizer, docs, tiny_model

    tok = AsciiTokenizer()
    model = tiny_model(seed=3)
    policy = make_policy("overwrite", chunk_size=16, max_chunks=8, max_memory_tokens=10)
    builder = PromptBuilder(tok, PromptTemplates(memory_update="Q{prompt}M{memory}C{chunk}>",
                                                 final="Q{prompt}M{memory}>"))
    samples = [dict(d, context=d["context"][:n]) for d, n in zip(docs(3, 60, seed=2), (60, 20, 40))]
    kw = dict(policy=policy, builder=builder, tokenizer=tok, group_size=3, training=True,
              gen_kwargs=dict(max_memory_new_tokens=12, max_final_new_tokens=6, seed=4))
    static = rollout(samples, generate_fn=sampler_generate_fn(model, tok, temperature=1.0), **kw)
    cont = rollout(samples, generate_fn=engine_generate_fn(model, tok, slots=4, max_len=128,
                                                            decode_steps=4, temperature=1.0), **kw)
    assert cont.stats["engine"]["prefill_calls"] > 1  # slots were refilled
    for a, b in zip(static.trajectories, cont.trajectories, strict=True):
        assert (a.memories, a.answer_text, a.conversation_ids) == (b.memories, b.answer_text,
                                                                   b.conversation_ids)
    for a, b in zip(static.conversations, cont.conversations, strict=True):
        assert (a.prompt, a.response, a.turn, a.is_final, a.finish_reason) == (
            b.prompt, b.response, b.turn, b.is_final, b.finish_reason)
        np.testing.assert_allclose(a.sampler_logps, b.sampler_logps, atol=1e-5)
    assert {c.finish_reason for c in cont.conversations} == {"eos", "length"}
    engine_stats = cont.stats.pop("engine")
    assert cont.stats == static.stats and 0 < engine_stats["occupancy"] <= 1


def test_trainer_collect_on_engine_equals_static(tmp_path):
    """`rollout.engine=continuous` gives the trainer the same generation batch as `static`."""
    from memagent_jax.agent.rollout import EngineGenerateFn
    from memagent_jax.config import load_config
    from memagent_jax.rl.trainer import Trainer
    from tiny_policy import AsciiTokenizer, docs, tiny_model

    tok = AsciiTokenizer()

    def collect(engine: str, out: str):
        cfg = load_config(None, [
            "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
            "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3",
            "agent.max_memory_tokens=4", "agent.max_final_new_tokens=4", "agent.question_budget=16",
            "rollout.group_size=3", "rl.train_batch_size=2", "rl.gen_batch_size=2",
            "rl.mini_batch_size=2", f"trainer.out_dir={tmp_path / out}", "trainer.progress=false",
            "trainer.async_checkpoint=false", f"rollout.engine={engine}", "rollout.max_rows_per_call=4"])
        stream = iter([docs(2, n, seed=1) for n in (30, 20, 40, 25)])
        trainer = Trainer(cfg, tiny_model(seed=5), tok, stream,
                          reward_fn=lambda t: (float(t.trajectory_id % 2),) * 2)
        fn = trainer.generate_fn()
        assert isinstance(fn, EngineGenerateFn) == (engine == "continuous")
        got = trainer.collect()
        trainer.close()
        return got.batch, fn

    static, _ = collect("static", "a")
    cont, fn = collect("continuous", "b")
    # Bounded by the agent's budgets (chat template + 16 + 4 + 12 + 4), not the 4096 window.
    assert max(len(c.prompt) + 4 for c in cont.conversations) <= fn.engine_config["max_len"] <= 128
    assert [t.memories for t in static.trajectories] == [t.memories for t in cont.trajectories]
    for a, b in zip(static.conversations, cont.conversations, strict=True):
        assert (a.prompt, a.response, a.finish_reason) == (b.prompt, b.response, b.finish_reason)
        np.testing.assert_allclose(a.sampler_logps, b.sampler_logps, atol=1e-5)


def test_engine_on_8_simulated_devices_equals_one_device():
    """tests/multidevice/engine_checks.py in a subprocess (JAX fixes its device count at import)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "multidevice" / "engine_checks.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                         " --xla_force_host_platform_device_count=8").strip()}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    results = json.loads(lines[-1])
    assert sorted(results) == ["d2_f2_t2", "d8"]
    for name, r in results.items():
        assert r["ok"], f"{name}:\n{r['error']}"


@pytest.mark.slow  # ~30 s: eval + train through the CLI on both engines
def test_eval_and_training_default_to_the_engine_with_the_static_results(tmp_path):
    """`evaluate` (and so `memagent-jax eval`) and the trainer's config use the engine unless told
    otherwise; the engine's cells equal the static sampler's (greedy, same seeds)."""
    from memagent_jax import eval as ev
    from memagent_jax.config import AgentSection, RolloutSection
    from tiny_policy import AsciiTokenizer

    assert RolloutSection().engine == "continuous"
    tok, model = AsciiTokenizer(), tiny_model(seed=5, max_position_embeddings=1024)
    agent = AgentSection(chunk_size=64, max_memory_tokens=8, max_final_new_tokens=8, question_budget=160)
    calls = eng.STATS.decode_calls
    kw = dict(tasks=["niah_single_1"], lengths=[200], num_samples=3, agent=agent, temperature=0.0,
              baselines=("full_context",), batch_size=2, progress=False)
    cont = ev.evaluate(model, tok, out_dir=tmp_path / "continuous", **kw)
    assert eng.STATS.decode_calls > calls  # the default ran on the engine
    static = ev.evaluate(model, tok, out_dir=tmp_path / "static", engine="static", **kw)
    for key, cell in cont["cells"].items():
        assert [r["response"] for r in cell["samples"]] == [r["response"] for r in static["cells"][key]["samples"]]
    with pytest.raises(ValueError, match="engine must be"):
        ev.evaluate(model, tok, out_dir=tmp_path / "x", engine="vllm", **kw)
