"""From a recipe's data section to checked train/validation datasets, with every dropped row accounted for."""
from collections import defaultdict
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..config.schema import Recipe
from ..errors import fail
from .formats import required_columns, to_example
from .reading import read_rows

SHOWN_ROWS = 5  # row numbers quoted per reason; the count is always complete


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    sha256: str
    rows_read: int
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> 1-based row numbers

    def dropped_summary(self) -> str:
        return dropped_summary(self.dropped, self.rows_read)


def dropped_summary(dropped: dict[str, list[int]], rows_read: int) -> str:
    total = sum(len(rows) for rows in dropped.values())
    parts = [f"{reason}: {len(rows)} ({_rows(rows)})" for reason, rows in dropped.items()]
    return f"{total} of {rows_read} rows unusable: " + "; ".join(parts)


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase | None, source: str) -> PreparedData:
    """Without a tokenizer (a hub one, checked offline) lengths are left unchecked; everything else is checked."""
    data = recipe.data
    raw = read_rows(data.path, data.limit, source)
    if not raw.rows:
        raise fail(source, "data.path", f"{data.path!r} holds no rows", "point data.path at a non-empty data set")
    examples, dropped = {}, defaultdict(list)
    for number, row in enumerate(raw.rows, start=1):
        example = to_example(row, data)
        if isinstance(example, str):
            dropped[example].append(number)
        else:
            examples[number] = example
    if not examples and all(reason.startswith("missing") for reason in dropped):
        raise _wrong_columns(raw.rows[0], data.format, source)
    too_long = f"longer than data.max_length={data.max_length} tokens"
    lengths = token_lengths(tokenizer, list(examples.values())) if tokenizer else []
    for number, length in zip(list(examples), lengths):
        if length > data.max_length:
            dropped[too_long].append(number)
            del examples[number]
    if not examples:
        raise fail(source, "data", f"no usable rows: {dropped_summary(dropped, len(raw.rows))}",
                   "fix the rows, or raise data.max_length if they are too long")
    if dropped and data.bad_rows == "fail":
        raise fail(source, "data.bad_rows", f"'fail' and {dropped_summary(dropped, len(raw.rows))}",
                   "fix those rows or set data.bad_rows: drop")
    train, validation = _split(Dataset.from_list(list(examples.values())), recipe, source)
    return PreparedData(train, validation, raw.sha256, len(raw.rows), dict(dropped))


def token_lengths(tokenizer: PreTrainedTokenizerBase, examples: list[dict]) -> list[int]:
    """Tokens per example as TRL will build it: prompt + completion + EOS."""
    if not examples:
        return []
    if isinstance(examples[0]["prompt"], list):
        return [len(tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=True)["input_ids"])
                for e in examples]
    texts = [e["prompt"] + e["completion"] + tokenizer.eos_token for e in examples]
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def _split(dataset: Dataset, recipe: Recipe, source: str) -> tuple[Dataset, Dataset | None]:
    size = recipe.data.validation_size
    if size == 0:
        return dataset, None
    count = round(size * len(dataset)) if size < 1 else int(size)
    if not 1 <= count < len(dataset):
        raise fail(source, "data.validation_size", f"{size} leaves {count} of {len(dataset)} rows for validation",
                   "choose a fraction or count that leaves rows on both sides")
    parts = dataset.train_test_split(test_size=count, seed=recipe.train.seed)
    return parts["train"], parts["test"]


def _wrong_columns(first_row, data_format: str, source: str):
    found = sorted(first_row) if isinstance(first_row, dict) else type(first_row).__name__
    return fail(source, "data.format", f"{data_format!r} needs columns {list(required_columns(data_format))}, "
                f"the data has {found}", "set data.format to match the file (alpaca, dolly, chat) or rename the columns")


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOWN_ROWS])
    return f"rows {shown}" + (", ..." if len(numbers) > SHOWN_ROWS else "")
