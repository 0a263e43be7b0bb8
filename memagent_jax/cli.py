"""`memagent-jax {demo,train,eval,answer,export,data,plan,compile}` (also `python -m memagent_jax`)."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

#: Exit status of a `train` stopped by SIGINT/SIGTERM (128 + SIGINT, as a shell reports Ctrl-C).
INTERRUPTED_EXIT = 130


def _cmd_train(args: argparse.Namespace) -> int:
    from memagent_jax.config import load_config
    from memagent_jax.train_run import run_training

    cfg = load_config(args.config, args.overrides)
    status = run_training(cfg)
    if status == "interrupted":  # SIGINT/SIGTERM: the trainer saved a checkpoint and stopped
        again = shlex.join(["memagent-jax", "train", args.config, *args.overrides])
        print(f"memagent-jax train: interrupted; checkpoint saved in {cfg.trainer.out_dir}: "
              f"resume with `{again}`", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"training {status}: {cfg.trainer.out_dir}")
    return 0


#: The `answer` flags that set each budget (named in window-fit errors).
ANSWER_FLAGS = {"chunk_size": "--chunk-size", "question_budget": "--question-budget",
                "memory_tokens": "--max-memory-tokens", "answer_tokens": "--max-answer-tokens"}
#: The `answer` flag of each agent setting (named in the settings line on stderr).
ANSWER_SETTING_FLAGS = {"policy": "--policy", "chunk_size": "--chunk-size", "max_memory_tokens": "--max-memory-tokens",
                        "max_final_new_tokens": "--max-answer-tokens", "question_budget": "--question-budget",
                        "final_style": "--final-style", "enable_thinking": "--enable-thinking"}


def _cmd_answer(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console
    from tqdm.auto import tqdm

    from memagent_jax.agent.cli_settings import folder_settings, warn_far_from_training
    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import builder_from_config
    from memagent_jax.agent.rollout import engine_generate_fn, rollout, sampler_generate_fn
    from memagent_jax.agent.window import default_budget, engine_max_len, fit_window, full_context_tokens
    from memagent_jax.checks import load_checked, read_text_document
    from memagent_jax.errors import InputError
    from memagent_jax.rl.rewards import answer_is_extract, boxed_answer

    console = Console(stderr=True)
    if not args.question.strip():
        raise InputError("--question is empty", None, 'ask a question, e.g. --question "Who wrote it?"')
    doc = read_text_document(args.doc, "--doc")  # a file of UTF-8 text, else one error naming it
    if not doc.strip():
        warnings.warn(f"{args.doc} is empty: the agent answers from the first memory", stacklevel=1)
    model, tokenizer = load_checked(args.model)
    window, source = model.config.max_position_embeddings, str(Path(args.model) / "config.json")
    # The agent settings the model was trained with (memagent_agent.json in its folder) are the
    # defaults; flags override them; what neither sets fits the window (below).
    settings = folder_settings(args.model, dict(
        policy=args.policy, chunk_size=args.chunk_size, max_memory_tokens=args.max_memory_tokens,
        max_final_new_tokens=args.max_answer_tokens, question_budget=args.question_budget,
        final_style=args.final_style, enable_thinking=args.enable_thinking))
    line = settings.summary(ANSWER_SETTING_FLAGS)
    if line:
        print(line, file=sys.stderr)
    agent = settings.agent
    builder = builder_from_config(tokenizer, agent)
    # Budgets neither given nor saved fit the window: the question's own length, MemAgent's 1024
    # (or an eighth of a smaller window) for the memory and the answer, and the largest chunk that
    # fits with them. A saved question budget is the trained one, not a limit on the question.
    q_len = len(tokenizer.encode(args.question))
    budget = args.question_budget if args.question_budget is not None else max(q_len, settings.question_budget or 0)
    if q_len > budget:
        raise InputError(f"the question is {q_len} tokens, over --question-budget {budget}", None,
                         "raise --question-budget (or leave it out: the question's own length)")
    memory_tokens = settings.max_memory_tokens or default_budget(window)
    answer_tokens = settings.max_final_new_tokens or default_budget(window)
    kwargs: dict[str, Any] = {}
    chunk_size = settings.chunk_size or agent.chunk_size
    if agent.policy == "full_context":
        room = full_context_tokens(builder, window, question_tokens=budget, answer_tokens=answer_tokens,
                                   names=ANSWER_FLAGS, source=source)
        print(f"full_context: up to {room} document tokens (the {window}-token window less the "
              f"template, the question and the answer {answer_tokens}); longer documents are "
              "center-truncated", file=sys.stderr)
        kwargs = dict(max_context_tokens=room)
    else:
        fit = fit_window(builder, window, question_budget=budget, memory_tokens=memory_tokens,
                         answer_tokens=answer_tokens, chunk_size=settings.chunk_size, names=ANSWER_FLAGS,
                         source=source)
        trained = args.chunk_size is None and settings.chunk_size is not None
        print(fit.summary("as trained" if trained else None), file=sys.stderr)
        chunk_size = fit.chunk_size
        if agent.policy == "overwrite":
            kwargs = dict(chunk_size=chunk_size, max_chunks=None, max_memory_tokens=memory_tokens)
    policy = make_policy(agent.policy, **{**kwargs, **agent.policy_kwargs})
    warn_far_from_training(settings, dataclasses.replace(
        agent, chunk_size=chunk_size, max_memory_tokens=memory_tokens, max_final_new_tokens=answer_tokens,
        question_budget=budget), question_tokens=q_len)
    if args.engine == "static":
        generate_fn = sampler_generate_fn(model, tokenizer, temperature=args.temperature,
                                          top_p=args.top_p, max_prompt_len=window)
    else:  # one slot: the turns of one document follow each other
        max_len = window if agent.policy != "overwrite" else engine_max_len(
            builder, window, question_budget=budget, memory_tokens=memory_tokens,
            chunk_size=kwargs["chunk_size"], answer_tokens=answer_tokens)
        generate_fn = engine_generate_fn(model, tokenizer, slots=1, max_len=max_len,
                                         temperature=args.temperature, top_p=args.top_p)
    bar = tqdm(desc="reading chunks", unit="chunk", file=sys.stderr)

    def on_step(k: int, n: int, trajs: list) -> None:
        bar.total = n
        bar.update(1)
        if args.show_memory:
            bar.clear()
            console.print(f"[bold]memory after chunk {k + 1}/{n}:[/bold] {trajs[0].memories[-1]}")

    result = rollout([{"question": args.question, "context": doc, "answers": []}], policy=policy,
                     builder=builder, tokenizer=tokenizer, generate_fn=generate_fn, group_size=1,
                     training=False, question_budget=budget, on_step=on_step,
                     gen_kwargs=dict(max_memory_new_tokens=memory_tokens,
                                     max_final_new_tokens=answer_tokens, seed=args.seed))
    bar.close()
    traj = result.trajectories[0]
    final = result.conversations[traj.conversation_ids[-1]]
    if final.finish_reason == "length":
        warnings.warn("the final answer hit --max-answer-tokens before EOS", stacklevel=1)
    answer = boxed_answer(traj.answer_text) or answer_is_extract(traj.answer_text)
    console.print(f"[dim]{traj.num_chunks} chunks, {result.stats['memory_capped']} memory replies capped[/dim]")
    print(answer if answer is not None else traj.answer_text.strip())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from memagent_jax.train_run import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, step=args.step, adapter=args.adapter)
    print(f"exported {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from memagent_jax.demo import run_demo

    config, overrides = args.config, list(args.overrides or [])
    if args.task is not None:  # the task's own config unless one is named; the task key wins
        config = config or ("tiny_multivalue" if args.task == "multivalue" else "tiny")
        overrides.append(f"demo.task={args.task}")
    run_demo(out_dir=args.out, fresh=args.fresh, config=config or "tiny", overrides=overrides,
             from_scratch=args.from_scratch, ship_base=args.ship_base, until=args.until)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from memagent_jax.eval import run_eval_cli

    run_eval_cli(args)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from memagent_jax.plan_cli import run_plan_cli

    return run_plan_cli(args) or 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from memagent_jax.compile_cli import run_compile_cli

    return run_compile_cli(args)


def _cmd_data(args: argparse.Namespace) -> int:
    from memagent_jax.data.tfds_builders import build_dataset

    from memagent_jax.errors import InputError

    bad = [kv for kv in args.inputs if "=" not in kv]
    if bad:
        raise InputError(f"builder input {bad[0]!r} is not key=value", None,
                         "write e.g. path=hotpot_dev_distractor_v1.json")
    inputs = dict(kv.split("=", 1) for kv in args.inputs)
    path = build_dataset(args.name, args.config, args.data_dir, overwrite=args.overwrite, **inputs)
    print(f"built {args.name}/{args.config} in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `memagent-jax` argument parser (every command also takes --debug)."""
    from memagent_jax.checks import non_negative_float, positive_int, probability

    p = argparse.ArgumentParser(prog="memagent-jax", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], **kwargs)
        parser.set_defaults(_parser=parser, _pairs=None)  # _pairs: where stray key=value args go
        return parser

    d = add("demo", help="the embedded default: train + evaluate a tiny memory agent")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--fresh", action="store_true", help="start over instead of resuming stages")
    d.add_argument("--config", default=None,
                   help="config name or YAML path (default tiny; with --task multivalue tiny_multivalue)")
    d.add_argument("--task", choices=("needle", "multivalue"), default=None,
                   help="the demo's task: needle (one value per question, the default) or multivalue "
                        "(several values of one key in distinct chunks; the memory must keep them)")
    d.add_argument("--from-scratch", action="store_true",
                   help="train the tokenizer and the base model here instead of using the shipped base")
    d.add_argument("--ship-base", action="store_true",
                   help="with --from-scratch: replace the shipped base (memagent_jax/demo/base) with this run's")
    d.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    d.set_defaults(fn=_cmd_demo, _pairs="overrides")

    t = add("train", help="DAPO RL of the memory agent")
    t.add_argument("config", help="YAML config (a path or a name under configs/)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(fn=_cmd_train, _pairs="overrides")

    a = add("answer", help="answer a question about a document of any length")
    a.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    a.add_argument("--doc", required=True, help="text file")
    a.add_argument("--question", required=True)
    a.add_argument("--policy", default=None,
                   help="memory policy name or module:Class (default: the model folder's, else overwrite)")
    a.add_argument("--show-memory", action="store_true", help="print the memory after each chunk")
    a.add_argument("--chunk-size", type=positive_int, default=None,
                   help="tokens per chunk (default: the model folder's trained chunk, else the largest "
                        "that fits the model's window)")
    a.add_argument("--max-memory-tokens", type=positive_int, default=None,
                   help="memory size = memory-turn reply budget (default: the folder's, else 1024, or "
                        "window/8 if smaller)")
    a.add_argument("--max-answer-tokens", type=positive_int, default=None,
                   help="answer budget (default: the folder's, else 1024, or window/8 if smaller)")
    a.add_argument("--question-budget", type=positive_int, default=None,
                   help="tokens kept for the question (default: the folder's or the question's length, "
                        "the larger)")
    a.add_argument("--final-style", default=None, choices=["boxed", "answer_is"],
                   help="final prompt (default: the folder's, else boxed)")
    a.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="let a Qwen3 model think (default: the folder's, else non-thinking prompts); "
                        "thinking is never kept in the memory")
    a.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-p", type=probability, default=1.0, help="in (0, 1]; 1 = off (default)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--engine", default="continuous", choices=["continuous", "static"],
                   help="the continuous-batching engine (default) or the static sampler")
    a.set_defaults(fn=_cmd_answer)

    e = add("eval", help="accuracy vs document length: table, CSV/JSON, plots")
    try:
        from memagent_jax.eval import add_eval_arguments

        add_eval_arguments(e)
    except ImportError:
        pass
    e.set_defaults(fn=_cmd_eval)

    x = add("export", help="orbax checkpoint of a run -> HF directory")
    x.add_argument("checkpoint", help="a run folder (its checkpoints/ and config.yaml)")
    x.add_argument("--out", required=True)
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    x.add_argument("--adapter", action="store_true",
                   help="a LoRA run: also write its adapters as a PEFT folder OUT/adapter "
                        "(transformers+peft, vLLM --enable-lora load it on the base model)")
    x.set_defaults(fn=_cmd_export)

    b = add("data", help="build a tfds dataset (array_record) from local files")
    b.add_argument("name", choices=["ruler_hotpotqa", "memagent_rows", "ruler_synthetic"])
    b.add_argument("config", help="builder config, e.g. n200 or niah_single_2_8192")
    b.add_argument("--data-dir", required=True)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("inputs", nargs="*", help="builder inputs as key=value (e.g. path=FILE)")
    b.set_defaults(fn=_cmd_data, _pairs="inputs")

    pl = add("plan", help="per-device memory plan for a config; suggests mesh shapes")
    try:
        from memagent_jax.plan_cli import add_plan_arguments

        add_plan_arguments(pl)
    except ImportError:
        pass
    pl.set_defaults(fn=_cmd_plan, _pairs="overrides")

    c = add("compile", help="AOT-compile every program of an RL step for a TPU topology (no TPU needed)")
    from memagent_jax.compile_cli import add_compile_arguments

    add_compile_arguments(c)
    c.set_defaults(fn=_cmd_compile, _pairs="overrides")
    return p


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a file, a flag, a setting): one line, exit status 2."""
    errors: list[type[BaseException]] = [ValueError, OSError, KeyError]
    try:
        import jinja2

        errors.append(jinja2.TemplateError)  # a chat template that rejects the conversation
    except ImportError:
        pass
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def error_message(command: str, e: BaseException) -> str:
    """`memagent-jax <command>: error: <what> (<file>): <fix>` for an input error."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # from open() & co.
        text = f"{e.strerror} ({e.filename}): check the path"
    return f"memagent-jax {command}: error: {text}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` arguments may come anywhere, also after options.

    argparse fills a trailing `nargs="*"` positional before it meets the options, so
    `data NAME CONFIG --data-dir DIR path=FILE` would leave `path=FILE` unrecognized: such
    arguments are appended to the command's overrides / inputs (in command-line order).
    """
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        pairs = [x for x in extra if "=" in x and not x.startswith("-")]
        rest = [x for x in extra if not ("=" in x and not x.startswith("-"))]
        if rest or args._pairs is None:
            args._parser.error(f"unrecognized arguments: {' '.join(rest or extra)}")
        getattr(args, args._pairs).extend(pairs)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memagent-jax` console script.

    Bad input prints one line (`memagent-jax <command>: error: <what> (<file>): <fix>`) and
    returns 2; `--debug` (before or after the command) raises instead, with the traceback.
    """
    args = parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except _input_errors() as e:
        if args.debug:
            raise
        print(error_message(args.command, e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
