"""The data formats, in one registry: which columns a row needs, how it becomes a prompt/completion example, and the
chat template that renders exactly the prompt the model is trained on (so tools that prompt by chat template prompt
the model as training did). Adding a format is adding one entry here.

Examples are TRL's shapes: prompt/completion for SFT ("sft" rows), prompt/chosen/rejected for preference pairs
("pairs"), prompt/completion/label for KTO's unpaired rows ("unpaired"). Prompts are plain strings for instruction
formats, message lists for chat (the last assistant turn is the completion, so loss-on-response works with any chat
template)."""
import re
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
    kind: str = "sft"  # the rows it makes: sft, pairs or unpaired (METHOD_KINDS says which methods train on them)
    by_rule: bool = False  # pairs made from SFT rows by a fixed rule: never suggested for rows that fit its columns


# What each train.method trains on; KTO takes pairs too, as one desirable and one undesirable row each.
METHOD_KINDS = {"sft": ("sft",), "dpo": ("pairs",), "kto": ("pairs", "unpaired")}


def _instruction_format(name: str, instruction: str, context: str, response: str) -> DataFormat:
    def to_example(row: dict, template) -> dict | str:
        problem = _strings(row, (instruction, response), (context,))
        return problem or {"prompt": render(template, row[instruction], row.get(context) or ""),
                           "completion": row[response]}

    return DataFormat(name, f"{instruction} / {context} (optional) / {response}", (instruction, response), to_example,
                      _instruction_chat_template, _instruction_prompt)


def _instruction_prompt(text: str, template) -> str:
    return render(template, text, "")


def _user_message(text: str, template) -> list:
    return [{"role": "user", "content": text}]


def _strings(row: dict, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> str | None:
    """Why the row's text fields are unusable, or None."""
    for key in keys:
        if key not in row or row[key] is None:
            return f"missing '{key}'"
    for key in keys + optional:
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"'{key}' is not a string"
    for key in keys[1:]:
        if not row[key].strip():
            return f"empty '{key}'"
    return None


def _preference_pair(row: dict, template) -> dict | str:
    problem = _strings(row, ("prompt", "chosen", "rejected"), ("input",))
    return problem or {"prompt": render(template, row["prompt"], row.get("input") or ""), "chosen": row["chosen"],
                       "rejected": row["rejected"]}


def _cut_pair(row: dict, template) -> dict | str:
    """Alpaca rows made into pairs by a written-down rule: chosen is the reference output, rejected the same output
    cut after half its words. A mechanical check that preference tuning works, not a claim about helpfulness."""
    problem = _strings(row, ("instruction", "output"), ("input",))
    if problem:
        return problem
    words = row["output"].split(" ")
    if len(words) < 4:
        return "'output' has fewer than 4 words to cut"
    return {"prompt": render(template, row["instruction"], row.get("input") or ""), "chosen": row["output"],
            "rejected": " ".join(words[:len(words) // 2])}


def _labelled(row: dict, template) -> dict | str:
    problem = _strings(row, ("prompt", "completion"), ("input",))
    if problem:
        return problem
    if not isinstance(row.get("label"), bool):
        return "'label' is not true or false"
    return {"prompt": render(template, row["prompt"], row.get("input") or ""), "completion": row["completion"],
            "label": row["label"]}


def _conversation(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "not a list of messages"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            return "a message lacks a 'role' or a string 'content'"
    return None


def _chat_pair(row: dict, template) -> dict | str:
    """TRL's conversational preference rows: an explicit prompt, or chosen/rejected conversations sharing one."""
    for key in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
        problem = _conversation(row.get(key))
        if problem:
            return f"'{key}': {problem}"
    prompt, chosen, rejected = row.get("prompt") or [], row["chosen"], row["rejected"]
    if not prompt:  # implicit prompt: everything before the replies
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant" or not reply[0]["content"].strip():
            return f"'{key}' does not end in one non-empty assistant reply after the prompt"
    if not prompt:
        return "no prompt before the replies"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_pair(row: dict, template) -> dict | str:
    """Anthropic HH-RLHF rows: chosen and rejected transcripts "\n\nHuman: ...\n\nAssistant: ..." that share every turn
    but the last assistant reply."""
    problem = _strings(row, ("chosen", "rejected"))
    if problem:
        return problem
    conversations = []
    for key in ("chosen", "rejected"):
        parts = _HH_TURN.split(row[key])
        if parts[0].strip() or len(parts) < 5:
            return f"'{key}' is not a Human/Assistant transcript"
        conversations.append([{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                              for who, text in zip(parts[1::2], parts[2::2])])
    return _chat_pair({"chosen": conversations[0], "rejected": conversations[1]}, template)


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


def _own_chat_template(template, bos: bool) -> None:
    """Chat formats keep the tokenizer's own chat template."""
    return None


def _pairs(name: str, doc: str, columns: tuple[str, ...], to_example, chat: bool, kind: str = "pairs",
           by_rule: bool = False) -> DataFormat:
    """A preference format: instruction prompts (chat: False) render with data.template as alpaca's do."""
    if chat:
        return DataFormat(name, doc, columns, to_example, _own_chat_template, _user_message, kind, by_rule)
    return DataFormat(name, doc, columns, to_example, _instruction_chat_template, _instruction_prompt, kind, by_rule)


FORMATS = {f.name: f for f in (
    _instruction_format("alpaca", "instruction", "input", "output"),
    _instruction_format("dolly", "instruction", "context", "response"),
    DataFormat("chat", "messages (role/content), rendered with the tokenizer's chat template; the last assistant "
               "turn is trained", ("messages",), _chat_example, _own_chat_template, _user_message),
    _pairs("preference", "prompt / input (optional) / chosen / rejected strings; the prompt renders with data.template "
           "as alpaca's instruction", ("prompt", "chosen", "rejected"), _preference_pair, chat=False),
    _pairs("preference-chat", "TRL's conversational pairs: chosen / rejected message lists, with a prompt list or "
           "sharing every turn but the last reply", ("chosen", "rejected"), _chat_pair, chat=True),
    _pairs("hh", "Anthropic HH-RLHF: chosen / rejected Human/Assistant transcripts differing in the last reply",
           ("chosen", "rejected"), _hh_pair, chat=True),
    _pairs("alpaca-cut", "alpaca rows as pairs by a fixed rule: chosen the output, rejected it cut after half its "
           "words (a mechanical check of preference tuning)", ("instruction", "output"), _cut_pair, chat=False,
           by_rule=True),
    _pairs("kto", "prompt / input (optional) / completion / label (true: desirable), unpaired", ("prompt",
           "completion", "label"), _labelled, chat=False, kind="unpaired"),
)}


def is_conversational(example: dict) -> bool:
    return isinstance(example["prompt"], list)


EXAMPLE_KEYS = ({"prompt", "completion"}, {"prompt", "chosen", "rejected"}, {"prompt", "completion", "label"})


def example_shape(example: dict) -> bool:
    """Whether a stored example (a run's validation.jsonl) has one of the shapes above: text prompts with text replies,
    or message lists with message lists, and a true/false label."""
    if set(example) not in EXAMPLE_KEYS:
        return False
    kind = type(example["prompt"])
    replies = [example[key] for key in ("completion", "chosen", "rejected") if key in example]
    return kind in (str, list) and all(isinstance(reply, kind) for reply in replies) and \
        isinstance(example.get("label", True), bool)


def response_example(example: dict) -> dict | None:
    """The prompt/completion whose response loss an example is scored on (eval, merge verification): an SFT example
    itself, a pair's chosen reply, a desirable KTO row; None for an undesirable one."""
    if "chosen" in example:
        return {"prompt": example["prompt"], "completion": example["chosen"]}
    if "label" in example and not example["label"]:
        return None
    return {"prompt": example["prompt"], "completion": example["completion"]}
