"""The prompt an adapter was trained with, so generation sees what training saw."""
from dataclasses import dataclass
from typing import Callable

from ..formats.registry import FORMATS
from ..formats.templates import resolve
from ..data.tokenize import prompt_ids, training_chat_template
from ..run_folder import RunFolder


@dataclass(frozen=True)
class TrainingPrompt:
    """How a run prompted its model: an instruction's prompt ids as training built them (None for a bare PEFT
    adapter, whose prompt format is unknown), and the chat template its exports carry."""
    ids: Callable[[str], list[int]] | None
    chat_template: str | None


def training_prompt(folder: RunFolder, tokenizer) -> TrainingPrompt:
    if not folder.is_run:
        return TrainingPrompt(None, tokenizer.chat_template)
    data = folder.recipe().data
    data_format, template = FORMATS[data.format], resolve(data.template)
    return TrainingPrompt(lambda text: prompt_ids(tokenizer, data_format.prompt_for(text, template)),
                          training_chat_template(data, tokenizer))
