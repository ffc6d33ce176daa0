"""Prompt templates. ALPACA is Stanford Alpaca's PROMPT_DICT verbatim (train.py): note that the prompt ends at
"### Response:" with no newline, and the response follows it directly.

A template is a pair of strings with {instruction} and {input} slots; the recipe's own templates (config.schema's
TemplatePair) have the same two attributes and are used interchangeably."""
import json
import re
from dataclasses import dataclass

SLOTS = ("instruction", "input")
_SLOT = re.compile(r"\{(instruction|input)\}")
_ANY_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class PromptTemplate:
    with_input: str
    without_input: str


ALPACA = PromptTemplate(
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    without_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
)


def render(template, instruction: str, input_text: str) -> str:
    # One regex pass, not str.format: instructions often hold literal braces (code, JSON) or even "{input}".
    values = {"instruction": instruction, "input": input_text}
    text = template.with_input if input_text else template.without_input
    return _SLOT.sub(lambda match: values[match.group(1)], text)


def slot_problems(text: str, needed: tuple[str, ...]) -> list[str]:
    """What is wrong with a template string's {placeholders}: unknown names (typos) and missing ones."""
    found = set(_ANY_SLOT.findall(text))
    problems = [f"unknown placeholder {{{name}}}" for name in sorted(found - set(SLOTS))]
    problems += [f"no {{{name}}} placeholder" for name in needed if name not in found]
    return problems


def as_jinja(text: str, values: dict[str, str]) -> str:
    """The template string as a Jinja fragment: literal text as quoted strings (so braces or Jinja syntax in the
    template stay literal), each {slot} as the Jinja expression in `values`."""
    parts, last = [], 0
    for match in _SLOT.finditer(text):
        parts += [_literal(text[last:match.start()]), "{{ " + values[match.group(1)] + " }}"]
        last = match.end()
    parts.append(_literal(text[last:]))
    return "".join(part for part in parts if part)


def _literal(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def resolve(template) -> PromptTemplate:
    """A recipe's data.template ('alpaca' or its own pair) as a template."""
    return ALPACA if template == "alpaca" else template
