"""A character-level fake tokenizer with a ChatML chat template (implements the Tokenizer protocol).

Every character is one id (ord(c) + number of specials); the special strings below are single
ids. Reusable by any test that needs a tokenizer without model files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SPECIALS = ("<|pad|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>")
SYSTEM_PROMPT = "You are a helpful assistant."


class CharTokenizer:
    """Character-level tokenizer; `<|im_end|>` ends a reply, `<|endoftext|>` also counts as EOS."""

    pad_id = 0
    eos_id = 1
    eos_ids = (1, 3)
    vocab_size = len(SPECIALS) + 0x110000
    _split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in SPECIALS:
                ids.append(SPECIALS.index(part))
            else:
                ids.extend(ord(c) + len(SPECIALS) for c in part)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i < len(SPECIALS):
                if not skip_special_tokens:
                    out.append(SPECIALS[i])
            else:
                out.append(chr(i - len(SPECIALS)))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    **template_kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_kwargs))
