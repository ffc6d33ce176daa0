"""`lora-tune merge`: fold an adapter into its base as standalone weights, safely, and prove the result."""
import errno
import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import sizes
from ..config.schema import QuantizationSection, Recipe
from ..errors import fail
from ..outputs import OutputFolder
from ..run_folder import RunFolder
from ..verify import ROWS
from ..weights.shards import base_shards, plan_entries
from .lora_deltas import LoraDeltas
from .model_card import model_card
from .report import MergeReport
from .streaming import Float16Overflow, SafetensorsExporter
from .weights import MergedWeights

# transformers and peft are imported only by the steps that need them (4-bit round trip, verification):
# a --no-verify merge of a 16-bit adapter is pure tensor streaming and should not pay seconds of imports.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")  # of those, what a tokenizer is built from


class Choice:
    """A decision with its reason, as the summary and merge_report.json state it."""

    def __init__(self, value, reason: str):
        self.value, self.reason = value, reason


def merge(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str | None = None,
          into: str = "auto", shard_size: str | int = "5GB", force: bool = False, verify: bool = True,
          verify_rows: int | None = None) -> MergeReport:
    """Merge ADAPTER (a run folder or PEFT adapter folder) into its base and write standalone weights to OUT.
    Returns the merge report (also written to OUT/merge_report.json)."""
    started = time.time()
    run = RunFolder(adapter)
    source = str(adapter)
    deltas = LoraDeltas(run.path, source)
    recipe = run.recipe() if run.is_run else None
    quantization = recipe.quantization if recipe else QuantizationSection()
    base_folder = resolve_base(base, run, source)
    targets = _merge_targets(into, quantization, verify, source)
    out_dtype = _default_dtype(recipe, base_folder) if dtype is None else Choice(DTYPES[dtype], "--dtype")
    entries = plan_entries(base_shards(base_folder, source), out_dtype.value, source)
    deltas.adapter.check_fits({entry.name: entry.shape for entry in entries}, str(base_folder), "--base")
    if verify:
        verify_rows = verify_rows or ROWS
    _check_memory(base_folder, entries, deltas, verify_rows if verify else None, "dequantized" in targets.value,
                  source)
    if verify and not any((tokenizer_source(run, base_folder) / name).is_file() for name in VOCABULARY_FILES):
        raise fail(source, "--base", f"no tokenizer files beside the adapter or in {str(base_folder)!r}, and "
                   "verification scores text", "copy the base model's tokenizer files into its folder, or pass "
                   "--no-verify")

    folder = OutputFolder(out, "--out", "model export", {"adapter": run.path, "base": base_folder}, source)
    folder.check_free(force)
    _check_disk(sum(e.nbytes for e in entries) * len(targets.value), folder.final.parent, source)
    max_bytes = sizes.parse(shard_size, source, "--shard-size")
    with folder.writing() as work:  # a failed verification keeps the export there, below, for a look
        places = {target: work if i == 0 else folder.temporary(f"partial-{target}")
                  for i, target in enumerate(targets.value)}
        try:
            with _write_limits_as_one_line(max_bytes, work, source):
                for target, place in places.items():
                    place.mkdir(exist_ok=True)
                    files, out_dtype = _write_weights(deltas, base_folder, place, out_dtype, max_bytes,
                                                      quantization if target == "dequantized" else None, recipe,
                                                      source)
                    _copy_side_files(base_folder, run, place, out_dtype.value)
            chosen, losses, verification = _check(run, places, targets, base_folder, quantization, recipe,
                                                  deltas, verify, verify_rows, source)
            if chosen.value != targets.value[0]:
                shutil.rmtree(work)
                places[chosen.value].rename(work)
        finally:
            for target, place in places.items():
                if place != work:
                    shutil.rmtree(place, ignore_errors=True)
    report = MergeReport(
        adapter=str(run.path.resolve()), base=str(base_folder), into=chosen.value, into_reason=chosen.reason,
        dtype=str(out_dtype.value).removeprefix("torch."), dtype_reason=out_dtype.reason,
        heldout_loss_by_target=losses, files=files, seconds=time.time() - started,
        base_quantization=quantization.mode, recipe_sha256=run.manifest().recipe_sha256 if run.is_run else None,
        verification=verification)
    (work / "merge_report.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (work / "README.md").write_text(model_card(report), encoding="utf-8")
    if verification is not None and not verification.passed:
        raise fail(source, "verification", f"the export fails: {verification.why}; it is kept in {str(work)!r}, not "
                   "put in place", _verification_fix(out_dtype.value))
    folder.finish()
    return report


def _check(run: RunFolder, places: dict, targets: Choice, base_folder: Path, quantization: QuantizationSection,
           recipe: Recipe | None, deltas: LoraDeltas, verify: bool, rows: int | None, source: str):
    """(the merge target kept, each target's held-out loss, the kept export's verification). Every model is
    streamed a module at a time (verify/streamed.py), so this needs a few tensors in memory at any model size."""
    if not verify:
        return Choice(targets.value[0], targets.reason), {}, None
    from ..weights.weight_map import config_of
    from ..verify.verdict import export_loss, verification_rows, verify_merge
    from .weights import streamed_source

    config = config_of(places[targets.value[0]])  # the export's: the base's without quantization_config
    load_dtype = getattr(torch, recipe.model.dtype) if recipe else None

    def model(folder: Path, name: str, adapter: LoraDeltas | None = None, on_4bit: bool = False):
        return streamed_source(folder, name, source, config, adapter, quantization if on_4bit else None, load_dtype)

    checked = verification_rows(run, places[targets.value[0]], config, rows)
    losses = {}
    if len(targets.value) > 1:
        losses = {target: export_loss(model(place, f"--into {target}"), checked) for target, place in places.items()}
        best = min(losses, key=losses.get)
        chosen = Choice(best, "auto: " + ", ".join(f"{t} {v:.4f}" for t, v in losses.items()) +
                        f" held-out loss; {best} kept")
    else:
        chosen = Choice(targets.value[0], targets.reason)
    on_4bit = chosen.value == "dequantized"
    where = "4-bit" if on_4bit else "full-precision"
    return chosen, losses, verify_merge(
        model(places[chosen.value], "the export"),
        model(base_folder, f"adapter on the {where} base (float32)", deltas, on_4bit),
        model(base_folder, f"the {where} base", None, on_4bit), checked)


def _write_weights(deltas, base_folder: Path, place: Path, out_dtype: Choice, max_bytes: int,
                   quantization: QuantizationSection | None, recipe: Recipe | None, source: str):
    """(files, dtype written). A float16 export that would overflow falls back to bfloat16 when float16 was the
    default, and is refused when it was asked for."""
    load_dtype = getattr(torch, recipe.model.dtype) if recipe else out_dtype.value
    weights = MergedWeights.of(base_folder, out_dtype.value, source, deltas, quantization, load_dtype)
    try:
        return SafetensorsExporter(max_bytes).write(weights, place), out_dtype
    except Float16Overflow as overflow:
        if out_dtype.reason == "--dtype":
            raise fail(source, "--dtype", f"fp16: merged {overflow.name!r} exceeds float16's range (65,504)",
                       "use --dtype bf16 or fp32") from None
        fallback = Choice(torch.bfloat16, f"default: float16 would overflow in {overflow.name!r}, so bfloat16")
        for stale in place.iterdir():
            stale.unlink()
        return _write_weights(deltas, base_folder, place, fallback, max_bytes, quantization, recipe, source)


def _verification_fix(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "merge with --dtype fp16 (3 more mantissa bits keep small updates bf16 rounds away) or --dtype fp32"
    if dtype == torch.float16:
        return "merge with --dtype fp32"
    return "report this with merge_report.json; --no-verify skips the check"


@contextmanager
def _write_limits_as_one_line(max_bytes: int, work: Path, source: str):
    """A file system that caps file sizes (FAT32: 4 GB), met while writing the export: one line that says what to
    change (a full disk is OutputFolder.writing's)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise fail(source, "--shard-size", f"a shard of up to {max_bytes:,} bytes is too large for a file in "
                       f"{str(work.parent)!r}", "pass a smaller --shard-size, e.g. 2GB") from None
        raise


def resolve_base(base: str | None, run: RunFolder, source: str) -> Path:
    """The base an adapter is merged into: --base, else the one its run (or adapter_config.json) names."""
    name = base or run.base_model()
    if not name:
        raise fail(source, "--base", "the adapter does not say which base it belongs to", "pass --base PATH")
    if Path(name).is_dir():
        return Path(name).resolve()
    from huggingface_hub import snapshot_download

    try:  # a hub id: its safetensors from the local cache, downloading only what is missing
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # offline, gated, or not found: all mean "give me a local folder"
        raise fail(source, "--base", f"cannot get base {name!r} ({type(exc).__name__})",
                   "download it first and pass --base DIR") from None


def _merge_targets(into: str, quantization: QuantizationSection, verify: bool, source: str) -> Choice:
    """The weights to merge into: for a 4-bit run, by default both the dequantized 4-bit weights training saw and the
    original ones, keeping whichever scores better on held-out rows (on real weights either can win)."""
    if into == "auto":
        if quantization.mode != "4bit":
            return Choice(("original",), "auto: the adapter was trained on an unquantized base" if
                          quantization.mode == "none" else "auto: 8-bit has no single dequantized weight")
        if verify:
            return Choice(("dequantized", "original"), "auto: both measured")
        return Choice(("dequantized",), "auto without verification: the weights training saw, unmeasured")
    if into == "dequantized" and quantization.mode != "4bit":
        why = ("8-bit matmuls keep outlier columns in 16-bit, so no single dequantized weight exists"
               if quantization.mode == "8bit" else "the adapter was trained on an unquantized base")
        raise fail(source, "--into", f"'dequantized' is not available: {why}", "use --into original or auto")
    return Choice((into,), "--into")


def _default_dtype(recipe: Recipe | None, base_folder: Path) -> Choice:
    """float32 runs export float32 (exact). 16-bit runs export float16: rounding W + BA to bfloat16's 8-bit mantissa
    drops much of a small update (a real bf16 export kept 87% of the held-out gain, float16 99.9%); a value beyond
    float16's range makes the merge fall back to bfloat16."""
    trained = recipe.model.dtype if recipe else _config_dtype(base_folder)
    if trained == "float32":
        return Choice(torch.float32, "default: the run trained in float32")
    return Choice(torch.float16, f"default: float16 keeps the adapter's small updates that bfloat16 rounds away "
                  f"(trained in {trained})")


def _config_dtype(base_folder: Path) -> str:
    config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def _check_memory(base_folder: Path, entries, deltas: LoraDeltas, rows: int | None, round_trip: bool,
                  source: str) -> None:
    """Refused before anything is written when it would not fit (plan/commands.py); rows None: no verification."""
    from ..plan import commands

    config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    numels = [math.prod(entry.shape) for entry in entries]
    shape = commands.Shape.of_config(config.get("text_config", config), sum(numels), max(numels))
    fix = "verify on fewer rows (--verify-rows 4) or pass --no-verify" if rows else "free some memory"
    commands.require(commands.merge(shape, deltas.params, rows, round_trip), source, "memory", fix)


def _check_disk(needed: int, parent: Path, source: str) -> None:
    while not parent.exists():  # the nearest folder that exists is on the device the export will be written to
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise fail(source, "--out", f"needs {sizes.show(needed)}, {parent} has {sizes.show(free)} free",
                   "free some space or choose another --out")


def _copy_side_files(base_folder: Path, run: RunFolder, work: Path, out_dtype: torch.dtype) -> None:
    """config.json without quantization, and the run's tokenizer files: they carry the chat template that renders
    the training prompt, so the export is prompted the way it was trained."""
    config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # the export is plain dense weights
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizers_from = tokenizer_source(run, base_folder)
    for name in TOKENIZER_FILES:
        if (tokenizers_from / name).is_file():
            shutil.copy2(tokenizers_from / name, work)
    if run.is_run and tokenizers_from != run.path and any((work / name).is_file() for name in VOCABULARY_FILES):
        _write_training_template(run, work)
    for name in (RunFolder.RECIPE, RunFolder.VALIDATION):  # so `lora-tune eval EXPORT` scores the run's rows
        if (run / name).is_file():
            shutil.copy2(run / name, work)
    if (base_folder / "generation_config.json").is_file():
        generation = json.loads((base_folder / "generation_config.json").read_text(encoding="utf-8"))
        eos = _eos_id(work)
        stops = generation.get("eos_token_id")
        stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
        if eos is not None and eos not in stops:  # generation stops where training's responses ended
            generation["eos_token_id"] = stops + [eos]
        (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def _write_training_template(run: RunFolder, work: Path) -> None:
    """A run folder whose tokenizer files were lost: the base's tokenizer is copied, and the chat template that
    renders the training prompt is written from the recipe, so the export still prompts as trained."""
    from transformers import AutoTokenizer

    from ..data.tokenize import training_chat_template

    template = training_chat_template(run.recipe().data, AutoTokenizer.from_pretrained(work))
    if template:
        (work / "chat_template.jinja").write_text(template, encoding="utf-8")


def tokenizer_source(run: RunFolder, base_folder: Path) -> Path:
    """The run's own tokenizer (it carries the training chat template) when it saved one, else the base's."""
    return run.path if (run / "tokenizer_config.json").is_file() else base_folder


def _eos_id(folder: Path) -> int | None:
    """The EOS token id the tokenizer files name, read from JSON (no tokenizer library needed)."""
    config, vocab = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not config.is_file() or not vocab.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tokenizer = json.loads(vocab.read_text(encoding="utf-8"))
    added = {token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])}
    return added.get(eos, tokenizer.get("model", {}).get("vocab", {}).get(eos))
