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

#: Qwen3's chat format (without tool calling), written for this project. No default system prompt.
#: An assistant turn's thinking is its `reasoning_content`, or the `<think>...</think>` block at the
#: start of its content; it is rendered (as `<think>\n...\n</think>\n\n` before the content) only
#: for assistant turns after the last user message, and dropped from earlier turns. With
#: `enable_thinking=False` the generation prompt ends in an empty think block, which tells the model
#: to answer without thinking; unset or true leaves the choice to the model.
QWEN3_TEMPLATE: str = (
    "{%- set ns = namespace(last_user=-1) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- set ns.last_user = loop.index0 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = message['content'] if message['content'] is string else '' %}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {%- if message['reasoning_content'] is string %}\n"
    "            {%- set thinking = message['reasoning_content'] %}\n"
    "        {%- elif '</think>' in content %}\n"
    "            {%- set thinking = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- else %}\n"
    "            {%- set thinking = '' %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- if loop.index0 > ns.last_user and (loop.last or thinking) %}\n"
    "            {{- '<think>\\n' + thinking.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)
