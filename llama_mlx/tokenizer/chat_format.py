"""Meta's Llama 3 chat format, with the Llama 3.1 tool turns of llama-models.

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

Roles: system, user, assistant, and ipython for tool output ("tool" is accepted and written as
"ipython"). An assistant turn that calls a tool ends with <|eom_id|> instead of <|eot_id|>
(`"stop_reason": "end_of_message"`); a code-interpreter call starts with <|python_tag|>
(`"python_tag": True`).
"""

from __future__ import annotations

from typing import Literal, Sequence, TypedDict

Role = Literal["system", "user", "assistant", "ipython", "tool"]


class Message(TypedDict, total=False):
    role: Role
    content: str
    stop_reason: Literal["end_of_turn", "end_of_message"]
    python_tag: bool


Dialog = Sequence[Message]

# The same format as a Hugging Face chat template, written into saved folders for mlx-lm and transformers.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('python_tag') %}{{- '<|python_tag|>' }}{%- endif %}"
    "{{- message['content'] | trim }}"
    "{%- if message['role'] == 'assistant' and message.get('stop_reason') == 'end_of_message' %}"
    "{{- '<|eom_id|>' }}"
    "{%- else %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _check_message(message) -> None:
    if not hasattr(message, "get") or not isinstance(message.get("role"), str):
        raise ValueError(f"a chat message must be a dict with a string 'role', got {message!r}")
    if not isinstance(message.get("content"), str):
        role, content = message["role"], message.get("content")
        raise ValueError(f"the content of a {role!r} message must be a string, got {content!r}")


class ChatFormat:
    """Encodes Llama 3 chat turns with a tokenizer that has Llama 3's special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._headers: dict[str, list[int]] = {}

    def _special(self, name: str) -> int:
        try:
            return self.tokenizer.special_tokens[name]
        except KeyError:
            raise ValueError(f"this vocabulary has no {name} token") from None

    def encode_header(self, message: Message) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` (role "tool" is written "ipython")."""
        role = message["role"]
        role = "ipython" if role == "tool" else role
        if role not in self._headers:  # the same few ids every turn
            self._headers[role] = [
                self._special("<|start_header_id|>"),
                *self.tokenizer.encode(role, bos=False, eos=False),
                self._special("<|end_header_id|>"),
                *self.tokenizer.encode("\n\n", bos=False, eos=False),
            ]
        return list(self._headers[role])

    def encode_message(self, message: Message) -> list[int]:
        """Header, stripped content (special-token text in it stays plain text), then the end token."""
        _check_message(message)
        tokens = self.encode_header(message)
        assistant = message["role"] == "assistant"
        if assistant and message.get("python_tag"):
            tokens.append(self._special("<|python_tag|>"))
        tokens.extend(self.tokenizer.encode(message["content"].strip(), bos=False, eos=False))
        end_of_message = assistant and message.get("stop_reason") == "end_of_message"
        tokens.append(self._special("<|eom_id|>" if end_of_message else "<|eot_id|>"))
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True) -> list[int]:
        """A whole conversation: BOS, every message, then the assistant header that asks for an answer."""
        tokens = [self._special("<|begin_of_text|>")]
        tokens.extend(self.encode_turn(dialog, add_generation_prompt=add_generation_prompt))
        return tokens

    def encode_turn(
        self,
        messages: Dialog,
        *,
        add_generation_prompt: bool = True,
        previous_stop: int | None = None,
        after_generation_prompt: bool = False,
    ) -> list[int]:
        """Only the tokens a new turn adds to a running conversation (no BOS).

        `previous_stop` is the stop token that ended the previous answer when it was sampled
        but never fed to the model: it goes first, closing that answer. `after_generation_prompt`:
        the conversation already ends with the assistant header that asked for an answer, so the
        first message (the assistant's answer) goes on without its header. With the ids already
        in the cache, these continue exactly `encode_dialog_prompt` of the whole conversation
        whenever the cached answer ids are those its text encodes to.
        """
        tokens = [] if previous_stop is None else [int(previous_stop)]
        for i, message in enumerate(messages):
            ids = self.encode_message(message)
            if i == 0 and after_generation_prompt:
                if message["role"] != "assistant":
                    raise ValueError(f"after the generation prompt comes an assistant message, not {message['role']!r}")
                ids = ids[len(self.encode_header(message)) :]
            tokens.extend(ids)
        if add_generation_prompt:
            tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens
