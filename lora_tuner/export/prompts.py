"""Prompts for verifying a merge: rows of the run's own data when it can be read, fixed text otherwise."""
from pathlib import Path

from transformers import AutoTokenizer

from ..config.schema import Recipe
from ..data.formats import to_example
from ..data.reading import read_rows
from ..errors import UserError

FALLBACK = ["Below is an instruction that describes a task.", "The quick brown fox jumps over the lazy dog.",
            "def fibonacci(n):", "Write a short poem about the sea."]
COUNT, MAX_TOKENS = 4, 128


def verification_prompts(recipe: Recipe | None, export_folder: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(export_folder)
    texts = _run_texts(recipe) or FALLBACK
    return [ids[:MAX_TOKENS] for ids in tokenizer(texts[:COUNT])["input_ids"]]


def _run_texts(recipe: Recipe | None) -> list[str]:
    if recipe is None or recipe.data.format == "chat":
        return []
    try:
        rows = read_rows(recipe.data.path, recipe.data.limit, "recipe").rows
    except UserError:  # the data moved or is on an unreachable hub: fixed text still proves the merge
        return []
    examples = (to_example(row, recipe.data) for row in rows[-50:])  # the tail, where validation rows often are
    return [e["prompt"] + e["completion"] for e in examples if isinstance(e, dict)][:COUNT]
