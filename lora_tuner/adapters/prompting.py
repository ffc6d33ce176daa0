"""The prompt an adapter was trained with, so generation sees what training saw."""
from typing import Callable

from ..data.formats import FORMATS
from ..data.templates import resolve
from ..data.tokenize import prompt_ids, training_chat_template
from ..run_folder import RunFolder


def training_prompt(folder: RunFolder, tokenizer) -> Callable[[str], list[int]] | None:
    """instruction -> the prompt's token ids as the run's training built them; None for a bare PEFT adapter, whose
    prompt format is unknown."""
    if not folder.is_run:
        return None
    data = folder.recipe().data
    data_format, template = FORMATS[data.format], resolve(data.template)
    return lambda text: prompt_ids(tokenizer, data_format.prompt_for(text, template))


def training_chat(folder: RunFolder, tokenizer) -> str | None:
    """The chat template the run's exports carry (it renders the training prompt); for a bare PEFT adapter, the
    tokenizer's own."""
    return training_chat_template(folder.recipe().data, tokenizer) if folder.is_run else tokenizer.chat_template
