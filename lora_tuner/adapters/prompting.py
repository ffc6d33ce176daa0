"""The prompt an adapter was trained with, so generation sees what training saw."""
from pathlib import Path
from typing import Callable

from ..config import load_recipe
from ..data.templates import render, resolve


def training_prompt(folder: Path, tokenizer) -> Callable[[str], str]:
    """text -> prompt: the run's Alpaca-style template or chat template; unchanged text for plain adapters."""
    recipe_path = folder / "recipe.yaml"
    if not recipe_path.is_file():
        return lambda text: text
    data = load_recipe(recipe_path).data
    if data.format == "chat":
        return lambda text: tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    template = resolve(data.template)
    return lambda text: render(template, text, "")
