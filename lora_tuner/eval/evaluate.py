"""`lora-tune eval`: held-out response loss and perplexity of the bare base, base + adapter and a merged export, on
the run's own validation rows (or a data file), with greedy generations side by side. Writes eval.json and eval.md
into the folder evaluated."""
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import fail
from ..run_folder import RunFolder, write_atomically
from ..verify.scoring import batches, loss, perplexity, tokenized_rows

DEFAULT_MAX_LENGTH = 1024
SHOWN_PROMPT = 300  # characters of each prompt quoted in eval.md


@dataclass
class Scored:
    name: str
    loss: float
    perplexity: float
    gain_kept: float | None = None  # share of the adapter's loss gain over the base this model keeps


@dataclass
class EvalReport:
    folder: str
    data: str  # where the rows came from
    held_out: bool | None  # None: rows from a file, which training may or may not have seen
    rows: int
    tokens: int
    models: list[Scored]
    computed_in: str | None  # dtype of the base and adapter rows
    generations: list[dict] = field(default_factory=list)  # {"prompt", "base", "adapter"}

    def table(self) -> str:
        lines = [f"{self.rows} {'held-out ' if self.held_out else ''}rows ({self.data}), {self.tokens:,} response tokens",
                 f"{'model':40s} {'loss':>8s} {'perplexity':>11s} {'gain kept':>10s}"]
        for m in self.models:
            kept = f"{m.gain_kept:.1%}" if m.gain_kept is not None else ""
            lines.append(f"{m.name:40s} {m.loss:8.4f} {m.perplexity:11.2f} {kept:>10s}")
        if self.computed_in:
            lines.append(f"base and adapter computed in {self.computed_in}, as trained")
        if self.held_out is False:
            lines.append("note: these rows were trained on (the run held none out): the loss flatters the adapter")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["# Evaluation", "", self.table().split("\n")[0], "", "| model | loss | perplexity | gain kept |",
                 "|---|---:|---:|---:|"]
        lines += [f"| {m.name} | {m.loss:.4f} | {m.perplexity:.2f} | "
                  f"{'' if m.gain_kept is None else f'{m.gain_kept:.1%}'} |" for m in self.models]
        for i, g in enumerate(self.generations, start=1):
            lines += ["", f"## Generation {i}", "", "Prompt (end):", "", "```", g["prompt"][-SHOWN_PROMPT:], "```", "",
                      "Base:", "", "```", g["base"], "```", "", "Adapter:", "", "```", g["adapter"], "```"]
        return "\n".join(lines) + "\n"


def evaluate(folder: str | Path, merged: str | Path | None = None, data: str | None = None, rows: int | None = None,
             generate: int = 0, max_new_tokens: int = 128) -> EvalReport:
    """FOLDER is a run folder (base, base + adapter, and the merged export given) or a merged export (the export,
    and its base when that is on disk)."""
    from ..adapters import AdapterPool

    target = RunFolder(folder)
    source = str(folder)
    if merged is not None:
        _check_merged(Path(merged), source)
    if target.is_run:
        pool = AdapterPool(str(target.path))
        pool.add("adapter", target.path)
        recipe, tokenizer = target.recipe(), pool.tokenizer
    elif (target / "merge_report.json").is_file():
        pool, recipe = None, RunFolder(target.path).recipe() if (target / RunFolder.RECIPE).is_file() else None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target.path)
        merged = merged or target.path
    else:
        raise fail(source, "folder", "not a lora-tune run folder nor a merged export",
                   "point at adapters/<run> or at a folder written by lora-tune merge")
    examples, held_out, where = _examples(target, recipe, tokenizer, data, source)
    examples = examples[:rows] if rows else examples
    max_length = recipe.data.max_length if recipe else DEFAULT_MAX_LENGTH
    tokenized = tokenized_rows(tokenizer, examples, max_length)
    scored_rows = batches(tokenized, tokenizer.pad_token_id or 0)
    models = []
    if pool is not None:
        with pool.use(None) as model:
            models.append(Scored("base", *_measure(model, scored_rows, "scoring the base")))
        with pool.use("adapter") as model:
            models.append(Scored("base + adapter", *_measure(model, scored_rows, "scoring base + adapter")))
    if merged is not None:
        from ..export.weights import streamed_source

        export = streamed_source(Path(merged), "the export", str(merged))  # streamed: fits at any size, in float32
        stored = str(export.config.dtype).removeprefix("torch.")
        models.append(Scored(f"merged {Path(merged).name} ({stored}, computed in float32)",
                             *_measure(export.model(), scored_rows, "scoring the export")))
    _gains(models)
    report = EvalReport(str(target.path), where, held_out, len(tokenized), sum(len(b.targets) for b in scored_rows),
                        models, str(pool.model.dtype).removeprefix("torch.") if pool else None,
                        _generations(pool, tokenized, generate, max_new_tokens) if pool else [])
    target.write_json(RunFolder.EVAL_JSON, asdict(report))
    write_atomically(target / RunFolder.EVAL_MD, report.markdown())
    return report


def _check_merged(merged: Path, source: str) -> None:
    """Refused before any model loads: not a model folder, a run folder, or weights that are not safetensors."""
    from ..export.base_reader import base_shards

    if not (merged / "config.json").is_file() or RunFolder(merged).has_adapter:
        raise fail(source, "--merged", f"{str(merged)!r} is not a merged model folder",
                   "point at a folder written by lora-tune merge")
    base_shards(merged, source, "--merged")


def _measure(model, scored_rows, desc: str) -> tuple[float, float]:
    value = loss(model, scored_rows, desc=desc)
    return value, perplexity(value)


def _gains(models: list[Scored]) -> None:
    names = {m.name: m for m in models}
    if "base" in names and "base + adapter" in names:
        gain = names["base"].loss - names["base + adapter"].loss
        for m in models[1:]:
            m.gain_kept = (names["base"].loss - m.loss) / gain if abs(gain) > 1e-9 else None


def _examples(target: RunFolder, recipe, tokenizer, data: str | None, source: str):
    """(prompt/completion examples, whether they were held out (None: unknown), where they came from)."""
    if data is None:
        examples, held_out = target.validation()
        if not examples:
            raise fail(source, "--data", "this folder records no validation rows", "pass --data FILE")
        return examples, held_out, f"{RunFolder.VALIDATION} of the run"
    if recipe is None:
        raise fail(source, "--data", "this folder has no recipe, so the rows' format and prompt are unknown",
                   "evaluate the run folder with --merged DIR instead")
    from ..data.prepare import prepare_data

    rows_recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={
        "path": data, "validation_size": 0, "limit": None, "bad_rows": "drop"})})
    prepared = prepare_data(rows_recipe, tokenizer, "--data")
    return [row.example for row in prepared.train], None, data


def _generations(pool, tokenized, count: int, max_new_tokens: int) -> list[dict]:
    shown = []
    for row in tqdm(tokenized[:count], desc="generating", unit="prompt", leave=False, disable=count == 0):
        base, adapter = (pool.generate_from_ids([row.prompt_ids], [name], max_new_tokens)[0] for name in (None, "adapter"))
        shown.append({"prompt": pool.tokenizer.decode(row.prompt_ids, skip_special_tokens=True), "base": base,
                      "adapter": adapter})
    return shown
