"""One `Tokenizer` protocol over HF `tokenizer.json` and SentencePiece `tokenizer.model` files.

Chat templates are rendered with Jinja the way `transformers` renders them (sandboxed immutable
environment, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`, a JSON `tojson`,
the named special tokens as variables), so `apply_chat_template` gives the same text as
`transformers`' `apply_chat_template(..., tokenize=False)` and `encode_chat` the same ids.

`mask_unknown_ids` guards against MemAgent issue #25: checkpoints pad the embedding matrix past the
tokenizer's vocabulary, and a sampled id the tokenizer does not know breaks the next prompt.
"""

from __future__ import annotations

import datetime
import functools
import io
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Re-exported: tests and configs import the templates from here.
from memagent_jax.chat_templates import (CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT,  # noqa: F401
                                         LLAMA3_TEMPLATE, QWEN2_5_TEMPLATE, QWEN3_TEMPLATE,
                                         chatml_template)
from memagent_jax.errors import InputError

Message = dict[str, Any]

#: Special symbols of the tiny SentencePiece default (ChatML markers + end of text).
SPECIAL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
#: Tokens that end a chat reply, preferred over `eos_token` for `eos_id` (Qwen, Llama-3).
CHAT_END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>")
#: Named special tokens that `transformers` passes to chat templates as variables.
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                   "mask_token")
#: Files that make up a tokenizer; `save_tokenizer` copies those that exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


@runtime_checkable
class Tokenizer(Protocol):
    """What the sampler, the agent and the trainer need from a tokenizer (docs/CONTRACTS.md)."""

    vocab_size: int  # ids the tokenizer knows; logits of ids >= this are masked
    eos_id: int  # the id that ends a chat reply
    eos_ids: tuple[int, ...]  # every id that ends a reply (eos_id first)
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str: ...

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]: ...


# ----------------------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        node = jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body)
        return node.set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's own filter this does not HTML-escape, as in transformers.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Message], *,
                         add_generation_prompt: bool = True,
                         special_tokens: dict[str, str] | None = None, **kwargs: Any) -> str:
    """Render `messages` with a Jinja chat `template` exactly as `transformers` does.

    Keys whose value is None are dropped from each message (as transformers does);
    `special_tokens` (bos_token, eos_token, ...) and `kwargs` become template variables.
    """
    if not messages:
        raise ValueError("Cannot apply a chat template to an empty conversation: pass at least one "
                         "message ({'role': ..., 'content': ...}).")
    msgs = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"Chat messages must be dicts with 'role' and 'content', got {m!r}")
        msgs.append({k: v for k, v in m.items() if v is not None})
    variables = {**(special_tokens or {}), **kwargs}
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return _compile_template(template).render(messages=msgs,
                                              add_generation_prompt=add_generation_prompt,
                                              **variables)


def _token_str(value: Any) -> str | None:
    """A special token from a config: a string, or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist; InputError naming the file
    when it is not valid JSON."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path.name} is not valid JSON ({e})", path,
                         "fix the file or copy it again from the checkpoint") from None
    return data if isinstance(data, dict) else {}


def _read_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json "chat_template" (as in transformers)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{model_dir}/tokenizer_config.json has several chat templates "
                             f"({sorted(map(str, named))}) and none named 'default'.")
    return template if isinstance(template, str) else None


def _config_eos_ids(model_dir: Path) -> list[int]:
    """eos_token_id entries (int or list) of generation_config.json then config.json."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(model_dir / name).get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        ids += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return ids


class _ChatMixin:
    """Template handling shared by both tokenizers (needs `chat_template`, `special_tokens_map`)."""

    chat_template: str | None
    special_tokens_map: dict[str, str]
    source_dir: Path
    vocab_size: int
    encode: Any  # (text) -> ids, defined by the tokenizer class
    token_to_id: Any  # (token) -> id | None, defined by the tokenizer class

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """The rendered prompt text (what transformers returns with tokenize=False).

        `template_kwargs` become template variables, as extra keyword arguments do in transformers
        (e.g. `enable_thinking=False` for Qwen3's template); templates ignore the ones they lack.
        """
        if self.chat_template is None:
            raise ValueError(f"The tokenizer in {self.source_dir} has no chat template: add "
                             "'chat_template' to tokenizer_config.json or a chat_template.jinja "
                             "file.")
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens_map, **template_kwargs)

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        """Token ids of the rendered prompt; no BOS/EOS beyond what the template writes."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt,
                                                    **template_kwargs))

    def _resolve_eos_pad(self, fallback_eos: Sequence[int]) -> None:
        """Set eos_id, eos_ids, pad_id: chat-end token first, then eos_token, then config files."""
        eos_token_id = self.token_to_id(self.special_tokens_map.get("eos_token"))
        chat_end = next((i for i in map(self.token_to_id, CHAT_END_TOKENS) if i is not None), None)
        candidates = [chat_end, eos_token_id, *_config_eos_ids(self.source_dir), *fallback_eos]
        valid = [i for i in candidates if i is not None and 0 <= i < self.vocab_size]
        if not valid:
            raise ValueError(f"No end-of-sequence token for the tokenizer in {self.source_dir}: "
                             "set 'eos_token' in tokenizer_config.json.")
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(valid))
        self.eos_id: int = self.eos_ids[0]
        pad = self.token_to_id(self.special_tokens_map.get("pad_token"))
        self.pad_id: int = pad if pad is not None else self.eos_id


# ----------------------------------------------------------------------------- HF tokenizers


class HFTokenizer(_ChatMixin):
    """A `tokenizer.json` directory (Qwen2.5, Llama-3, ...) through the `tokenizers` library.

    Reads tokenizer_config.json (named special tokens, added tokens, chat template),
    chat_template.jinja, and eos ids from generation_config.json / config.json.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        import tokenizers

        self.source_dir = Path(model_dir)
        path = self.source_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an HF tokenizer needs tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a plain Exception
            raise InputError(f"unreadable tokenizer.json ({e})", path,
                             "copy tokenizer.json again from the checkpoint") from None
        config = _read_json(self.source_dir / "tokenizer_config.json")
        self._add_config_tokens(config, tokenizers.AddedToken)
        self.special_tokens_map: dict[str, str] = {
            k: v for k in _NAMED_SPECIALS if (v := _token_str(config.get(k))) is not None}
        self.chat_template = _read_template(self.source_dir, config)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # ids the tokenizer knows: max id + 1 (== get_vocab_size(with_added_tokens=True) w/o gaps)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        self._resolve_eos_pad(())

    def _add_config_tokens(self, config: dict[str, Any], added_token: Any) -> None:
        """Add tokens named in tokenizer_config.json but absent from tokenizer.json (as HF does)."""
        for entry in (config.get("added_tokens_decoder") or {}).values():
            content = _token_str(entry)
            if content is not None and self._tok.token_to_id(content) is None:
                kwargs = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized",
                                                "special") if k in entry}
                self._tok.add_tokens([added_token(content, **kwargs)])
        for key in _NAMED_SPECIALS:
            content = _token_str(config.get(key))
            if content is not None and self._tok.token_to_id(content) is None:
                self._tok.add_special_tokens([added_token(content, special=True)])

    def token_to_id(self, token: str | None) -> int | None:
        """The id of `token`, or None when the vocabulary lacks it."""
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added/special tokens in the text map to their ids; no BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (e.g. <|im_end|>) are dropped when skip_special_tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(_ChatMixin):
    """A SentencePiece `tokenizer.model` (the tiny default, or a checkpoint's own model).

    The chat template comes from tokenizer_config.json / chat_template.jinja next to the model,
    else CHATML_TEMPLATE. Special tokens are the control pieces plus the tokens the config names
    (eos/pad/bos/..., additional_special_tokens, special added tokens), or SPECIAL_TOKENS when the
    config names none.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        import sentencepiece as spm

        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: SentencePiece needs tokenizer.model")
        self.model_file = path
        self.source_dir = path.parent
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise InputError(f"unreadable SentencePiece model ({e})", path,
                             "copy tokenizer.model again from the checkpoint") from None
        self.vocab_size: int = int(self._sp.get_piece_size())
        config = _read_json(self.source_dir / "tokenizer_config.json")
        self.chat_template = _read_template(self.source_dir, config) or CHATML_TEMPLATE
        self.special_tokens_map: dict[str, str] = {
            k: v for k in _NAMED_SPECIALS if (v := _token_str(config.get(k))) is not None}
        if "bos_token" not in self.special_tokens_map and self._sp.bos_id() >= 0:
            self.special_tokens_map["bos_token"] = self._sp.id_to_piece(self._sp.bos_id())
        named = [*self.special_tokens_map.values(),
                 *(_token_str(t) for t in config.get("additional_special_tokens") or []),
                 *(_token_str(e) for e in (config.get("added_tokens_decoder") or {}).values()
                   if isinstance(e, dict) and e.get("special"))]
        ids = [i for i in map(self.token_to_id, named) if i is not None]
        if not ids:
            ids = [i for i in map(self.token_to_id, SPECIAL_TOKENS) if i is not None]
        controls = [i for i in range(self.vocab_size) if self._sp.is_control(i)]
        self.special_ids: frozenset[int] = frozenset(ids + controls)
        self._resolve_eos_pad([self._sp.eos_id()])

    def token_to_id(self, token: str | None) -> int | None:
        """The id of the piece `token`, or None when the model lacks it (never the unk id)."""
        if token is None:
            return None
        i = int(self._sp.piece_to_id(token))
        return i if self._sp.id_to_piece(i) == token else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; user-defined symbols stay single ids; no BOS/EOS."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special/control pieces are dropped when skip_special_tokens."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(ids)


def _sentences(texts: Iterable[str], max_sentences: int) -> Iterator[str]:
    """Paragraphs (split on blank lines, newlines kept), in order, at most `max_sentences`."""
    paragraphs = (p + "\n\n" for text in texts for p in text.split("\n\n") if p.strip())
    return itertools.islice(paragraphs, max_sentences)


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike[str], vocab_size: int,
                        *, model_type: str = "bpe", chat_template: str = CHATML_TEMPLATE,
                        max_sentences: int = 200_000) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `texts` and write a tokenizer directory.

    Writes out_dir/tokenizer.model and out_dir/tokenizer_config.json (chat_template, eos_token
    "<|im_end|>", pad_token "<|endoftext|>"). Settings make any text round-trip (byte fallback,
    identity normalization, whitespace kept, no dummy prefix) and the result deterministic (one
    thread, no shuffling, a fixed seed, the first `max_sentences` paragraphs).
    """
    import sentencepiece as spm

    min_vocab = 256 + len(SPECIAL_TOKENS) + 2  # byte pieces, specials, unk, one more piece
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-fallback SentencePiece "
                         f"model: use vocab_size >= {min_vocab}.")
    sentences = list(_sentences(texts, max_sentences))
    if not sentences:
        raise ValueError("train_sentencepiece got no text: pass a non-empty iterable of strings.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, shuffle_input_sentence=False, num_threads=1,
        max_sentence_length=1 << 20, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    config = {"chat_template": chat_template, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "additional_special_tokens": list(SPECIAL_TOKENS),
              "tokenizer_class": "SentencePieceTokenizer"}
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return SentencePieceTokenizer(out)


# ----------------------------------------------------------------------------- loading, saving


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Tokenizer:
    """tokenizer.json -> HFTokenizer, else tokenizer.model -> SentencePieceTokenizer."""
    d = Path(model_dir)
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d)
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer(d)
    what = "does not exist" if not d.exists() else "has neither tokenizer.json nor tokenizer.model"
    raise FileNotFoundError(
        f"No tokenizer in {d}: the directory {what}. Expected tokenizer.json (HF tokenizers) or "
        "tokenizer.model (SentencePiece), plus tokenizer_config.json for the chat template; copy "
        "them from the checkpoint (save_tokenizer) or train one (train_sentencepiece).")


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the tokenizer's files (TOKENIZER_FILES that exist) into `out_dir`; return the copies.

    generation_config.json is copied too when out_dir has none (it carries the eos ids).
    """
    src = getattr(tokenizer, "source_dir", None)
    if src is None:
        raise TypeError(f"save_tokenizer needs a tokenizer loaded from files, got {tokenizer!r}")
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: src / name for name in TOKENIZER_FILES}
    if isinstance(tokenizer, SentencePieceTokenizer):
        files["tokenizer.model"] = tokenizer.model_file
    if not (out / "generation_config.json").exists():
        files["generation_config.json"] = src / "generation_config.json"
    copied = []
    for name, path in files.items():
        if path.is_file():
            dest = out / name
            if dest.resolve() != path.resolve():
                shutil.copyfile(path, dest)
            copied.append(dest)
    return copied


# ----------------------------------------------------------------------------- logits


def _mask_fill(dtype: Any) -> float:
    """-1e30, or the dtype's most negative finite value when -1e30 does not fit (fp16)."""
    try:
        lowest = float(np.finfo(dtype).min)
    except (TypeError, ValueError):  # bfloat16 & co. (numpy does not know them)
        import ml_dtypes

        lowest = float(ml_dtypes.finfo(dtype).min)
    return max(-1e30, lowest)


def mask_unknown_ids(logits: Any, vocab_size: int) -> Any:
    """Set logits of ids >= vocab_size (the last axis) to a large finite negative.

    Works on numpy and jax arrays (jit-safe for a static `vocab_size`); the fill is -1e30, or
    the dtype's most negative value when -1e30 does not fit (fp16). Returns the same kind of array.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    n = logits.shape[-1]
    if vocab_size >= n:
        return logits
    if isinstance(logits, np.ndarray):
        xp: Any = np
    else:
        import jax.numpy as jnp

        xp = jnp
    fill = _mask_fill(logits.dtype)
    keep = xp.arange(n) < vocab_size
    return xp.where(keep, logits, xp.asarray(fill, dtype=logits.dtype))
