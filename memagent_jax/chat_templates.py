"""Chat templates as data (Jinja strings, rendered the way `transformers` renders them).

Real checkpoints bring their own template (`tokenizer_config.json` "chat_template" or
`chat_template.jinja`); these constants are used by the tiny SentencePiece default and by tests
that build tokenizer directories. They are written for this project, not copied from a hub repo;
for plain (no tools) conversations they render the same text as the originals.
"""

from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _jinja_string_literal(text: str) -> str:
    """Quote `text` as a Jinja string literal (Jinja unescapes literals like Python does)."""
    escaped = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return "'" + escaped + "'"


def chatml_template(default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """A ChatML (Qwen2.5-style) template.

    When the first message is not a system message, `default_system` is rendered as one (no system
    block at all when it is None or empty). Each message is
    `<|im_start|>{role}\\n{content}<|im_end|>\\n`; the generation prompt is
    `<|im_start|>assistant\\n`.
    """
    lines = []
    if default_system:
        lines += [
            "{%- if messages[0]['role'] != 'system' %}",
            "    {{- '<|im_start|>system\\n' + " + _jinja_string_literal(default_system)
            + " + '<|im_end|>\\n' }}",
            "{%- endif %}",
        ]
    lines += [
        "{%- for message in messages %}",
        "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] +"
        " '<|im_end|>\\n' }}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}",
        "    {{- '<|im_start|>assistant\\n' }}",
        "{%- endif %}",
    ]
    return "\n".join(lines) + "\n"


#: ChatML with the generic default system prompt (the tiny SentencePiece default).
CHATML_TEMPLATE: str = chatml_template(DEFAULT_SYSTEM_PROMPT)

#: Qwen2.5-Instruct's format (without tool calling): Qwen's default system prompt, ChatML turns.
QWEN2_5_TEMPLATE: str = chatml_template(QWEN_SYSTEM_PROMPT)

#: No roles and no markers: the user message as is, the reply right after it (the tiny demo's
#: tokenizer: its prompts end with the question, so the question's key is two tokens before the
#: reply, which a 2-layer model copies with a previous-token head).
PLAIN_TEMPLATE: str = (
    "{%- for message in messages %}\n"
    "    {{- message['content'] }}\n"
    "{%- endfor %}\n"
)

#: Llama-3-Instruct's format: BOS once, header-wrapped turns with stripped content, `<|eot_id|>`.
LLAMA3_TEMPLATE: str = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim }}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
