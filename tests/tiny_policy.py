"""A small-vocabulary tokenizer and tiny random policies for trainer/eval tests."""

from __future__ import annotations

from fake_tokenizer import SPECIALS, CharTokenizer

from memagent_jax.models import ModelConfig, init_model


class AsciiTokenizer(CharTokenizer):
    """CharTokenizer restricted to ASCII (non-ASCII becomes '?'): 4 specials + 128 ids."""

    vocab_size = len(SPECIALS) + 128

    def encode(self, text: str) -> list[int]:
        return super().encode("".join(c if ord(c) < 128 else "?" for c in text))


def tiny_model(vocab_size: int = 132, seed: int = 0, **overrides):
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
               num_heads=2, num_kv_heads=1, tie_word_embeddings=True, max_position_embeddings=4096)
    cfg.update(overrides)
    return init_model(ModelConfig(**cfg), seed=seed)


def docs(n: int, length: int = 40, seed: int = 0) -> list[dict]:
    """n tiny documents with a question and an answer."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice("abcdefgh ") for _ in range(length))
        out.append({"question": f"q{i}?", "context": text, "answers": [f"a{i}"]})
    return out


def letters_reward(trajectory) -> tuple[float, float]:
    """(reward, accuracy) of a tiny policy's answer: its share of the letters x, y, z, w (a goal a
    random tiny model reaches sometimes, so groups are mixed and RL has something to learn)."""
    target = set(AsciiTokenizer().encode("xyzw"))
    r = sum(i in target for i in AsciiTokenizer().encode(trajectory.answer_text)) / 4.0
    return r, float(r > 0.5)
