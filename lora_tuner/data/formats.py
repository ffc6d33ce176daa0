"""Turn raw rows of each format into TRL prompt/completion examples, naming what is wrong with bad rows.

Plain strings for alpaca/dolly (TRL appends EOS to the completion); message lists for chat, where the last
assistant turn is the completion, so loss-on-response works with any chat template."""
from ..config.schema import DataSection
from .templates import render, resolve

# format -> (instruction key, optional input key, response key)
FIELDS = {"alpaca": ("instruction", "input", "output"), "dolly": ("instruction", "context", "response")}


def required_columns(data_format: str) -> tuple[str, ...]:
    if data_format == "chat":
        return ("messages",)
    instruction, _, response = FIELDS[data_format]
    return instruction, response


def to_example(row, data: DataSection) -> dict | str:
    """The TRL example for a row, or a short reason why the row is unusable."""
    if not isinstance(row, dict):
        return f"not an object ({type(row).__name__})"
    if data.format == "chat":
        return _chat_example(row)
    instruction_key, input_key, response_key = FIELDS[data.format]
    for key in (instruction_key, response_key):
        if key not in row or row[key] is None:
            return f"missing '{key}'"
    for key in (instruction_key, input_key, response_key):
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"'{key}' is not a string"
    if not row[response_key].strip():
        return f"empty '{response_key}'"
    prompt = render(resolve(data.template), row[instruction_key], row.get(input_key) or "")
    return {"prompt": prompt, "completion": row[response_key]}


def _chat_example(row: dict) -> dict | str:
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return "'messages' is not a list of at least two messages"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            return "a message lacks a 'role' or a string 'content'"
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return "the last message is not a non-empty assistant reply"
    return {"prompt": messages[:-1], "completion": messages[-1:]}
