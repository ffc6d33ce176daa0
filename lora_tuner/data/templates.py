"""Prompt templates. ALPACA is Stanford Alpaca's PROMPT_DICT verbatim (train.py): note that the prompt ends at
"### Response:" with no newline, and the response follows it directly."""
import re

from ..config.schema import TemplatePair

ALPACA = TemplatePair(
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


def resolve(template: str | TemplatePair) -> TemplatePair:
    return ALPACA if template == "alpaca" else template


_SLOT = re.compile(r"\{(instruction|input)\}")


def render(template: TemplatePair, instruction: str, input_text: str) -> str:
    # One regex pass, not str.format: instructions often hold literal braces (code, JSON) or even "{input}".
    values = {"instruction": instruction, "input": input_text}
    text = template.with_input if input_text else template.without_input
    return _SLOT.sub(lambda match: values[match.group(1)], text)
