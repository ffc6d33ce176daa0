"""From a recipe's data section to checked, tokenized train/validation rows, with every dropped row accounted for."""
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config.schema import Recipe
from ..errors import fail
from ..formats.registry import FORMATS, METHOD_KINDS
from .reading import read_rows
from ..formats.templates import resolve
from .tokenize import Tokenized, TokenizedExample, TokenizedLabelled, tokenize_rows

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

SHOWN_ROWS = 5  # row numbers quoted per reason; the count is always complete


@dataclass
class Row:
    number: int  # 1-based position in the source data, as error messages and run.json name rows
    example: dict  # prompt/completion, prompt/chosen/rejected or prompt/completion/label (formats.py)
    tokens: Tokenized | None  # None when prepared without a tokenizer (validate with a hub tokenizer)


@dataclass
class PreparedData:
    train: list[Row]
    eval: list[Row]
    sha256: str
    rows_read: int
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> row numbers

    def dropped_summary(self) -> str:
        return dropped_summary(self.dropped, self.rows_read)

    def dataset(self, split: str, train_on_inputs: bool) -> "Dataset | None":
        """The split as TRL's pre-tokenized rows: input_ids/labels (SFT; TRL packs them), prompt_ids/chosen_ids/
        rejected_ids (DPO) or prompt_ids/completion_ids/label (KTO)."""
        from datasets import Dataset  # a second to import; validate prepares rows without it

        rows = getattr(self, split)
        if not rows:
            return None
        return Dataset.from_list([row.tokens.training_row(train_on_inputs) for row in rows])

    @property
    def train_tokens(self) -> int:
        return sum(len(row.tokens) for row in self.train)


def dropped_summary(dropped: dict[str, list[int]], rows_read: int) -> str:
    total = sum(len(rows) for rows in dropped.values())
    parts = [f"{reason}: {len(rows)} ({_rows(rows)})" for reason, rows in dropped.items()]
    return f"{total} of {rows_read} rows unusable: " + "; ".join(parts)


def prepare_data(recipe: Recipe, tokenizer: "PreTrainedTokenizerBase | None") -> PreparedData:
    """Without a tokenizer (a hub one, checked offline) lengths are left unchecked; everything else is checked."""
    data = recipe.data
    data_format = FORMATS[data.format]
    raw = read_rows(data.path, data.limit)
    if not raw.rows:
        raise fail("data.path", f"{data.path!r} holds no rows", "point data.path at a non-empty data set")
    kind = data_format.kind
    rows, dropped, template = [], defaultdict(list), resolve(data.template)
    for number, item in enumerate(raw.rows, start=1):
        example = data_format.to_example(item, template) if isinstance(item, dict) else \
            f"not an object ({type(item).__name__})"
        if isinstance(example, dict) and not _valid_unicode(example):
            example = "text that is not valid Unicode (a lone surrogate, e.g. \\ud800 in JSON)"
        if isinstance(example, str):
            dropped[example].append(number)
        else:
            rows.append(Row(number, example, None))
    if not rows and all(reason.startswith("missing") for reason in dropped):
        raise _wrong_columns(raw.rows[0], recipe, template)
    if tokenizer is not None:
        _check_chat_template(rows, tokenizer, recipe)
        rows = _tokenized(rows, tokenizer, data.max_length, dropped, kind)
    if not rows:
        raise fail("data", f"no usable rows: {dropped_summary(dropped, len(raw.rows))}",
                   "fix the rows, or raise data.max_length if they are too long")
    if dropped and data.bad_rows == "fail":
        raise fail("data.bad_rows", f"'fail' and {dropped_summary(dropped, len(raw.rows))}",
                   "fix those rows or set data.bad_rows: drop")
    train, validation = _split(rows, recipe)
    if recipe.train.method == "kto" and kind == "pairs":  # KTO trains on each reply alone; validation keeps the pairs
        train = [one for row in train for one in unpaired(row)]
    return PreparedData(train, validation, raw.sha256, len(raw.rows), dict(dropped))


def _valid_unicode(value) -> bool:
    """Every text in an example encodes as UTF-8: JSON can spell half of a surrogate pair, which no tokenizer takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_valid_unicode(item) for item in value.values())
    return all(_valid_unicode(item) for item in value) if isinstance(value, list) else True


def _check_chat_template(rows: list[Row], tokenizer, recipe: Recipe) -> None:
    """Message-list rows are rendered by the tokenizer's chat template: without one there is no prompt to train."""
    if rows and isinstance(rows[0].example["prompt"], list) and not tokenizer.chat_template:
        raise fail("data.format", f"{recipe.data.format!r} rows are conversations, which the tokenizer's chat "
                   "template renders, and this tokenizer has none", "use a tokenizer with a chat template "
                   "(model.tokenizer), or rows in a text format (alpaca, preference, kto)")


def unpaired(row: Row) -> list[Row]:
    """A pair as KTO's two rows: the chosen reply desirable, the rejected one not."""
    prompt, pair = row.example["prompt"], row.tokens
    return [Row(row.number, {"prompt": prompt, "completion": row.example["chosen"], "label": True},
                pair and TokenizedLabelled(TokenizedExample(pair.prompt_ids, pair.chosen_ids), True)),
            Row(row.number, {"prompt": prompt, "completion": row.example["rejected"], "label": False},
                pair and TokenizedLabelled(TokenizedExample(pair.prompt_ids, pair.rejected_ids), False))]


def _tokenized(rows: list[Row], tokenizer, max_length: int, dropped: dict, kind: str) -> list[Row]:
    kept = []
    too_long = f"longer than data.max_length={max_length} tokens"
    for row, tokens in zip(rows, tokenize_rows(tokenizer, [row.example for row in rows], kind)):
        if isinstance(tokens, str):
            dropped[tokens].append(row.number)
        elif len(tokens) > max_length:
            dropped[too_long].append(row.number)
        else:
            kept.append(Row(row.number, row.example, tokens))
    return kept


def _split(rows: list[Row], recipe: Recipe) -> tuple[list[Row], list[Row]]:
    size = recipe.data.validation_size
    if size == 0:
        return rows, []
    count = round(size * len(rows)) if size < 1 else int(size)
    if not 1 <= count < len(rows):
        raise fail("data.validation_size", f"{size:g} leaves {count} of {len(rows)} usable rows for validation",
                   "choose a fraction or count that leaves rows on both sides")
    held_out = set(random.Random(recipe.train.seed).sample(range(len(rows)), count))
    return ([row for i, row in enumerate(rows) if i not in held_out],
            [row for i, row in enumerate(rows) if i in held_out])


def _wrong_columns(first_row, recipe: Recipe, template):
    """Names the format the rows are in, when one the recipe's method trains on reads the first row."""
    data_format = recipe.data.format
    found = sorted(first_row) if isinstance(first_row, dict) else type(first_row).__name__
    reads = [f.name for f in FORMATS.values() if f.kind in METHOD_KINDS[recipe.train.method] and not f.by_rule
             and isinstance(first_row, dict) and isinstance(f.to_example(first_row, template), dict)]
    fix = (f"set data.format: {reads[0]} (it reads these rows)" if reads else
           f"set data.format to match the file ({', '.join(FORMATS)}) or rename the columns")
    return fail("data.format", f"{data_format!r} needs columns {list(FORMATS[data_format].columns)}, "
                f"the data has {found}", fix)


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOWN_ROWS])
    return f"rows {shown}" + (", ..." if len(numbers) > SHOWN_ROWS else "")
