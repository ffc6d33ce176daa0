"""The data formats, in one registry: which columns a row needs, how it becomes a prompt/completion example, and the
chat template that renders exactly the prompt the model is trained on (so tools that prompt by chat template prompt
the model as training did). Adding a format is adding one entry here.

Examples are TRL's prompt/completion shape: plain strings for instruction formats, message lists for chat (the last
assistant turn is the completion, so loss-on-response works with any chat template)."""
from dataclasses import dataclass
from typing import Callable

from .templates import as_jinja, render


@dataclass(frozen=True)
class DataFormat:
    name: str
    doc: str  # one line, shown in the recipe reference
    columns: tuple[str, ...]  # required in every row
    to_example: Callable[[dict, object], dict | str]  # (row, prompt template) -> example, or why the row is unusable
    # (prompt template, whether training encodings start with BOS) -> chat template; None keeps the tokenizer's own
    chat_template: Callable[[object, bool], str | None]
    # (a user's instruction, prompt template) -> the prompt training would build for it (generation, eval)
    prompt_for: Callable[[str, object], str | list]


def _instruction_format(name: str, instruction: str, context: str, response: str) -> DataFormat:
    def to_example(row: dict, template) -> dict | str:
        for key in (instruction, response):
            if key not in row or row[key] is None:
                return f"missing '{key}'"
        for key in (instruction, context, response):
            if row.get(key) is not None and not isinstance(row[key], str):
                return f"'{key}' is not a string"
        if not row[response].strip():
            return f"empty '{response}'"
        return {"prompt": render(template, row[instruction], row.get(context) or ""),
                "completion": row[response]}

    return DataFormat(name, f"{instruction} / {context} (optional) / {response}", (instruction, response), to_example,
                      _instruction_chat_template, lambda text, template: render(template, text, ""))


def _instruction_chat_template(template, bos: bool) -> str:
    """A user message renders the training prompt (its optional 'input' key fills {input}); an assistant message
    renders the response and the EOS training appended. Single-turn, as the format is."""
    slots = {"instruction": "message['content']", "input": "message['input']"}
    return "".join([
        "{%- for message in messages -%}",
        "{%- if loop.first -%}{{ bos_token }}{%- endif -%}" if bos else "",
        "{%- if message['role'] == 'user' -%}",
        "{%- if message.get('input') -%}", as_jinja(template.with_input, slots),
        "{%- else -%}", as_jinja(template.without_input, slots), "{%- endif -%}",
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}",
        "{%- else -%}{{ raise_exception('this model was trained on instruction/response pairs: use user and "
        "assistant messages only') }}{%- endif -%}",
        "{%- endfor -%}",
    ])


def _chat_example(row: dict, template) -> dict | str:
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return "'messages' is not a list of at least two messages"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            return "a message lacks a 'role' or a string 'content'"
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return "the last message is not a non-empty assistant reply"
    return {"prompt": messages[:-1], "completion": messages[-1:]}


FORMATS = {f.name: f for f in (
    _instruction_format("alpaca", "instruction", "input", "output"),
    _instruction_format("dolly", "instruction", "context", "response"),
    DataFormat("chat", "messages (role/content), rendered with the tokenizer's chat template; the last assistant "
               "turn is trained", ("messages",), _chat_example, lambda template, bos: None,
               lambda text, template: [{"role": "user", "content": text}]),
)}


def is_conversational(example: dict) -> bool:
    return isinstance(example["prompt"], list)
