"""`lora-tune eval`: held-out response loss and perplexity of the bare base, base + adapter and a merged export, on
the run's own validation rows (or a data file), with greedy generations side by side; for a preference run also the
start adapter, and each model's preference accuracy and reward margin (preference.py). Writes eval.json and eval.md
into the folder evaluated."""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..formats.registry import response_example
from ..errors import about, fail
from ..outputs import Output, write_text
from ..run_folder import RunFolder
from ..verify.scoring import batches, loss, perplexity, scored_tokens, tokenized_rows
from .preference import PairLogps, pair_logps, preference_score, tokenized_pairs

DEFAULT_MAX_LENGTH = 1024
SHOWN_PROMPT = 300  # characters of each prompt quoted in eval.md


@dataclass
class Scored:
    name: str
    loss: float
    perplexity: float
    gain_kept: float | None = None  # share of the adapter's loss gain over the base this model keeps
    preference_accuracy: float | None = None  # preference runs: share of pairs the implicit reward gets right
    reward_margin: float | None = None  # mean implicit reward of chosen minus rejected


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
    pairs: int = 0  # preference pairs scored (preference runs)
    reference: str | None = None  # the model rewards are measured against, and beta

    def table(self) -> str:
        pairs = f"; {self.pairs} pairs, rewards against {self.reference}" if self.pairs else ""
        lines = [f"{self.rows} {'held-out ' if self.held_out else ''}rows ({self.data}), {self.tokens:,} response "
                 f"tokens{pairs}",
                 f"{'model':40s} {'loss':>8s} {'perplexity':>11s} {'gain kept':>10s}"
                 + (f" {'pref. acc.':>10s} {'margin':>8s}" if self.pairs else "")]
        for m in self.models:
            kept = f"{m.gain_kept:.1%}" if m.gain_kept is not None else ""
            preferred = "" if not self.pairs else f" {_share(m.preference_accuracy):>10s} " + \
                ("" if m.reward_margin is None else f"{m.reward_margin:8.3f}")
            lines.append(f"{m.name:40s} {m.loss:8.4f} {m.perplexity:11.2f} {kept:>10s}" + preferred)
        if self.pairs:
            lines.append("loss: response loss on the chosen replies; pref. acc.: share of pairs whose implicit reward "
                         "prefers chosen (ties half)")
        if self.computed_in:
            lines.append(f"base and adapter computed in {self.computed_in}, as trained")
        if self.held_out is False:
            lines.append("note: these rows were trained on (the run held none out): the loss flatters the adapter")
        return "\n".join(lines)

    def markdown(self) -> str:
        extra = " pref. acc. | margin |" if self.pairs else ""
        lines = ["# Evaluation", "", self.table().split("\n")[0], "", "| model | loss | perplexity | gain kept |" + extra,
                 "|---|---:|---:|---:|" + ("---:|---:|" if self.pairs else "")]
        lines += [f"| {m.name} | {m.loss:.4f} | {m.perplexity:.2f} | "
                  f"{'' if m.gain_kept is None else f'{m.gain_kept:.1%}'} |"
                  + (f" {_share(m.preference_accuracy)} | {'' if m.reward_margin is None else f'{m.reward_margin:.3f}'} |"
                     if self.pairs else "") for m in self.models]
        for i, g in enumerate(self.generations, start=1):
            lines += ["", f"## Generation {i}", "", "Prompt (end):", "", "```", g["prompt"][-SHOWN_PROMPT:], "```", "",
                      "Base:", "", "```", g["base"], "```", "", "Adapter:", "", "```", g["adapter"], "```"]
        return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def evaluate(folder: str | Path, merged: str | Path | None = None, data: str | None = None, rows: int | None = None,
             generate: int = 0, max_new_tokens: int = 128) -> EvalReport:
    """Score a run and write eval.json and eval.md into it.

    Args:
        folder: a run folder (base, base + adapter, the start adapter, and the merged export given) or a merged export
            (the export alone).
        merged: a merged export to score beside them.
        data: a data file in the run's format to score instead of the run's validation rows.
        rows: score only the first N rows.
        generate: show K greedy generations, base and adapter side by side.
        max_new_tokens: the longest generation.

    Example:
        report = evaluate("adapters/smollm2-135m-alpaca", generate=3)
    """
    with about(folder):
        return _evaluate(RunFolder(folder), Path(merged) if merged else None, data, rows, generate, max_new_tokens)


def _evaluate(target: RunFolder, merged: Path | None, data: str | None, rows: int | None, generate: int,
              max_new_tokens: int) -> EvalReport:
    if merged is not None:
        _check_merged(merged)
    pool, recipe, tokenizer = _load(target)
    if merged is not None and pool is not None:
        _check_same_model(merged, pool.model.config)
    merged = merged or (None if pool else target.path)
    start = target.start_adapter() if pool else None  # as pinned when the run trained: wherever eval runs from
    written = Output(target / RunFolder.EVAL_JSON, "FOLDER", "evaluation report", {
        "--data file": data, "--merged export": merged, "base": pool.base_id if pool else None,
        "start adapter": start}, beside=(".md",))
    examples, held_out, where = _examples(target, recipe, tokenizer, data)
    examples = examples[:rows] if rows else examples
    max_length = recipe.data.max_length if recipe else DEFAULT_MAX_LENGTH
    tokenized = _scored_rows(examples, tokenizer, max_length, where, "--data" if data else RunFolder.VALIDATION)
    scored_rows = batches(tokenized, tokenizer.pad_token_id or 0)
    pairs = tokenized_pairs(tokenizer, [e for e in examples if "chosen" in e], max_length) if pool else []
    models, logps = _score_pool(pool, start, scored_rows, pairs) if pool else ([], {})
    reference = _score_preferences(models, logps, recipe) if pairs else None
    if merged is not None:
        models.append(_score_export(merged, scored_rows))
    _gains(models)
    report = EvalReport(str(target.path), where, held_out, len(tokenized), sum(len(b.targets) for b in scored_rows),
                        models, str(pool.model.dtype).removeprefix("torch.") if pool else None,
                        _generations(pool, tokenized, generate, max_new_tokens) if pool else [], len(pairs), reference)
    write_text(written.final, json.dumps(asdict(report), indent=2) + "\n")
    write_text(written.beside[0], report.markdown())
    return report


def _load(target: RunFolder):
    """(pool with the run's adapter as "adapter", or None for a merged export; the recipe; the tokenizer)."""
    from ..adapters import AdapterPool

    if target.is_run:
        pool = AdapterPool(str(target.path))
        pool.add("adapter", target.path)
        return pool, target.recipe(), pool.tokenizer
    if (target / "merge_report.json").is_file():
        from transformers import AutoTokenizer

        recipe = target.recipe() if target.file(RunFolder.RECIPE) else None
        return None, recipe, AutoTokenizer.from_pretrained(target.path)
    raise fail("folder", "not a lora-tune run folder nor a merged export",
               "point at adapters/<run> or at a folder written by lora-tune merge")


def _scored_rows(examples: list[dict], tokenizer, max_length: int, where: str, field: str):
    """The rows' responses as training tokenized them; refused when there is nothing to score."""
    responses = [e for e in map(response_example, examples) if e is not None]
    tokenized = tokenized_rows(tokenizer, responses, max_length)
    if not scored_tokens(tokenized):
        raise fail(field, f"the {len(examples)} rows of {where} give no response tokens to score (no row "
                   f"with a response, or a desirable one, that fits {max_length} tokens)",
                   "pass --data FILE with rows that have responses")
    return tokenized


def _score_pool(pool, start: Path | None, scored_rows, pairs) -> tuple[list[Scored], dict[str, PairLogps]]:
    """The bare base, the start adapter (when the run had one) and the result, each scored on the same rows."""
    if start is not None:
        pool.add("start", start)
    models, logps = [], {}
    for name, adapter in (("base", None), ("start (init.adapter)", "start" if start else None),
                          ("base + adapter", "adapter")):
        if name == "base" or adapter is not None:
            with pool.use(adapter) as model:
                models.append(Scored(name, *_measure(model, scored_rows, f"scoring {name}")))
                if pairs:
                    logps[name] = pair_logps(model, pairs, pool.tokenizer.pad_token_id or 0, f"pairs of {name}")
    return models, logps


def _score_export(merged: Path, scored_rows) -> Scored:
    """A merged export, streamed: fits at any size, in float32."""
    from ..export.merged_weights import streamed_source

    export = streamed_source(merged, "the export")
    stored = str(export.config.dtype).removeprefix("torch.")
    return Scored(f"merged {merged.name} ({stored}, computed in float32)",
                  *_measure(export.model(), scored_rows, "scoring the export"))


def _score_preferences(models: list[Scored], logps: dict[str, PairLogps], recipe) -> str:
    """Each model's preference accuracy and margin, rewards measured as the run measured them (its reference and
    beta); returns which reference that was."""
    settings = getattr(recipe.train, recipe.train.method)  # only a preference run's rows hold pairs
    beta = settings.beta
    uses_start = recipe.init.adapter is not None and settings.reference == "start"
    reference = "start (init.adapter)" if uses_start else "base"
    for model in models:
        if model.name in logps:
            score = preference_score(logps[model.name], logps[reference], beta)
            model.preference_accuracy, model.reward_margin = score.accuracy, score.margin
    return f"{reference}, beta {beta:g}"


def _check_merged(merged: Path) -> None:
    """Refused before any model loads: not a model folder, a run folder, or weights that are not safetensors."""
    from ..weights.shards import base_shards

    if not (merged / "config.json").is_file() or RunFolder(merged).has_adapter:
        raise fail("--merged", f"{str(merged)!r} is not a merged model folder",
                   "point at a folder written by lora-tune merge")
    base_shards(merged, "--merged")


def _check_same_model(merged: Path, base_config) -> None:
    """A merged export of this run's base: another model scores the run's rows with a vocabulary or shape that does
    not fit them (an index error, or a meaningless gain)."""
    from ..weights.weight_map import config_of

    theirs, ours = config_of(merged).get_text_config(), base_config.get_text_config()
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(theirs, key, None) != getattr(ours, key, None):
            raise fail("--merged", f"{str(merged)!r} has {key} {getattr(theirs, key, None)!r}, the run's "
                       f"base {getattr(ours, key, None)!r}", "point at the merged export of this run")


def _measure(model, scored_rows, desc: str) -> tuple[float, float]:
    value = loss(model, scored_rows, desc=desc)
    return value, perplexity(value)


def _gains(models: list[Scored]) -> None:
    names = {m.name: m for m in models}
    if "base" in names and "base + adapter" in names:
        gain = names["base"].loss - names["base + adapter"].loss
        for m in models[1:]:
            m.gain_kept = (names["base"].loss - m.loss) / gain if abs(gain) > 1e-9 else None


def _examples(target: RunFolder, recipe, tokenizer, data: str | None):
    """(examples as prepared for training, whether they were held out (None: unknown), where they came from)."""
    if data is None:
        examples, held_out = target.validation_examples()
        if not examples:
            raise fail("--data", "this folder records no validation rows", "pass --data FILE")
        return examples, held_out, f"{RunFolder.VALIDATION} of the run"
    if recipe is None:
        raise fail("--data", "this folder has no recipe, so the rows' format and prompt are unknown",
                   "evaluate the run folder with --merged DIR instead")
    from ..data.prepare import prepare_data

    rows_recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={
        "path": data, "validation_size": 0, "limit": None, "bad_rows": "drop"})})
    with about("--data"):
        prepared = prepare_data(rows_recipe, tokenizer)
    return [row.example for row in prepared.train], None, data


def _generations(pool, tokenized, count: int, max_new_tokens: int) -> list[dict]:
    shown = []
    for row in tqdm(tokenized[:count], desc="generating", unit="prompt", leave=False, disable=count == 0):
        base, adapter = (pool.generate_from_ids([row.prompt_ids], [name], max_new_tokens)[0] for name in (None, "adapter"))
        shown.append({"prompt": pool.tokenizer.decode(row.prompt_ids, skip_special_tokens=True), "base": base,
                      "adapter": adapter})
    return shown
