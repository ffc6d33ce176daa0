"""`lora-tune validate`: check a recipe and everything local it points at, without loading weights."""
from .config import Recipe
from .data.prepare import prepare_data
from .data.reading import BUILTIN_DEMO, is_local
from .model.loading import check_base_source
from .model.tokenizer import load_tokenizer


def check_recipe(recipe: Recipe, source: str) -> list[str]:
    """Raise UserError on the first broken input; return notes on what could only be checked when run."""
    notes = []
    check_base_source(recipe.model, source)
    tokenizer_name = recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = None
    if tokenizer_name == "bytes" or is_local(tokenizer_name):
        tokenizer = load_tokenizer(recipe.model, source)
    else:
        notes.append(f"tokenizer {tokenizer_name!r} is on the hub: token lengths are checked when the run starts")
    if recipe.data.path == BUILTIN_DEMO or is_local(recipe.data.path):
        data = prepare_data(recipe, tokenizer, source)
        notes.append(f"data: {len(data.train)} train / {len(data.eval) if data.eval else 0} validation rows"
                     + (f"; would drop {data.dropped_summary()}" if data.dropped else ""))
    else:
        notes.append(f"data {recipe.data.path!r} is on the hub: its rows are checked when the run starts")
    return notes
