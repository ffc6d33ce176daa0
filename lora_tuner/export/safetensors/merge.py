"""`lora-tune merge`: fold an adapter into its base as standalone safetensors weights, safely, and prove the result:
write each merge target, then verify through verify/ (the same shape as the GGUF writer's)."""
import errno
import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ... import sizes
from ...config.schema import QuantizationSection, Recipe
from ...errors import about, fail
from ...outputs import OutputFolder
from ...run_folder import RunFolder
from ...verify import ROWS
from ...weights.shards import base_shards, plan_entries
from ..inputs import VOCABULARY_FILES, resolve_base, tokenizer_source
from ..lora_deltas import LoraDeltas
from ..merged_weights import MergedWeights
from ..report import MergeReport
from .model_card import model_card
from .streaming import Float16Overflow, SafetensorsExporter

# transformers and peft are imported only by the steps that need them (4-bit round trip, verification):
# a --no-verify merge of a 16-bit adapter is pure tensor streaming and should not pay seconds of imports.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


class Choice:
    """A decision with its reason, as the summary and merge_report.json state it."""

    def __init__(self, value, reason: str):
        self.value, self.reason = value, reason


def merge(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str | None = None,
          into: str = "auto", shard_size: str | int = "5GB", force: bool = False, verify: bool = True,
          verify_rows: int | None = None) -> MergeReport:
    """Merge an adapter into its base and write standalone weights that plain transformers loads; the report is also
    written to OUT/merge_report.json. Refused in one line, before anything is written, when it cannot succeed.

    Args:
        adapter: a run folder or PEFT adapter folder.
        out: the folder for the merged model (never an input, nor inside one).
        base: the base folder or hub id (default: the one the run pinned, or adapter_config.json's).
        dtype: bf16, fp16 or fp32 (default: fp16 for 16-bit runs, bf16 if a value exceeds fp16; fp32 runs: fp32).
        into: for a QLoRA run, original, dequantized, or auto (both, keeping the better on held-out rows).
        shard_size: the largest output shard, e.g. "5GB".
        force: replace an existing `out`.
        verify: score the export against base + adapter on held-out rows.
        verify_rows: how many rows to verify on (default 16).

    Example:
        report = merge("adapters/smollm2-135m-alpaca", "merged/smollm2-alpaca")
        print(report.verification.top1_agreement)
    """
    with about(adapter):
        job = Merge(RunFolder(adapter), base, dtype, into, verify)
        job.plan(out, force, verify_rows or ROWS, sizes.parse(shard_size, "--shard-size"))
        return job.execute()


class Merge:
    """One merge in phases: plan (every check, before anything is written), write (each merge target, streamed),
    verify (the kept target against the adapter), report."""

    def __init__(self, run: RunFolder, base: str | None, dtype: str | None, into: str, verify: bool):
        self.started, self.run, self.verify = time.time(), run, verify
        self.deltas = LoraDeltas(run.path)
        self.recipe = run.recipe() if run.is_run else None
        self.quantization = self.recipe.quantization if self.recipe else QuantizationSection()
        self.base = resolve_base(base, run)
        self.targets = _merge_targets(into, self.quantization, verify)
        self.dtype = _default_dtype(self.recipe, self.base) if dtype is None else Choice(DTYPES[dtype], "--dtype")
        self.load_dtype = getattr(torch, self.recipe.model.dtype) if self.recipe else None

    def plan(self, out: str | Path, force: bool, rows: int, max_bytes: int) -> None:
        self.rows, self.max_bytes = rows, max_bytes
        entries = plan_entries(base_shards(self.base), self.dtype.value)
        self.deltas.adapter.check_fits({entry.name: entry.shape for entry in entries}, str(self.base), "--base")
        self._check_memory(entries)
        if self.verify and not any((tokenizer_source(self.run, self.base) / n).is_file() for n in VOCABULARY_FILES):
            raise fail("--base", f"no tokenizer files beside the adapter or in {str(self.base)!r}, and "
                       "verification scores text", "copy the base model's tokenizer files into its folder, or pass "
                       "--no-verify")
        self.folder = OutputFolder(out, "--out", "model export", {"adapter": self.run.path, "base": self.base})
        self.folder.check_free(force)
        _check_disk(sum(e.nbytes for e in entries) * len(self.targets.value), self.folder.final.parent)

    def execute(self) -> MergeReport:
        with self.folder.writing() as work:  # a failed verification keeps the export there, below, for a look
            places = {target: work if i == 0 else self.folder.temporary(f"partial-{target}")
                      for i, target in enumerate(self.targets.value)}
            try:
                files = self.write(places, work)
                chosen, losses, verification = self.check(places)
                if chosen.value != self.targets.value[0]:
                    shutil.rmtree(work)
                    places[chosen.value].rename(work)
            finally:
                for place in places.values():
                    if place != work:
                        shutil.rmtree(place, ignore_errors=True)
        report = self.report(chosen, losses, files, verification)
        (work / "merge_report.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (work / "README.md").write_text(model_card(report), encoding="utf-8")
        if verification is not None and not verification.passed:
            raise fail("verification", f"the export fails: {verification.why}; it is kept in {str(work)!r}, not "
                       "put in place", _verification_fix(self.dtype.value))
        self.folder.finish()
        return report

    def write(self, places: dict[str, Path], work: Path) -> list[str]:
        """Each merge target's weights and side files into its place; the files of the last."""
        with _write_limits_as_one_line(self.max_bytes, work):
            for target, place in places.items():
                place.mkdir(exist_ok=True)
                files = self._write_weights(place, self.quantization if target == "dequantized" else None)
                _copy_side_files(self.base, self.run, place, self.dtype.value)
        return files

    def _write_weights(self, place: Path, quantization: QuantizationSection | None) -> list[str]:
        """The merged shards. A float16 export that would overflow falls back to bfloat16 when float16 was the
        default, and is refused when it was asked for."""
        weights = MergedWeights.of(self.base, self.dtype.value, self.deltas, quantization,
                                   self.load_dtype or self.dtype.value)
        try:
            return SafetensorsExporter(self.max_bytes).write(weights, place)
        except Float16Overflow as overflow:
            if self.dtype.reason == "--dtype":
                raise fail("--dtype", f"fp16: merged {overflow.name!r} exceeds float16's range (65,504)",
                           "use --dtype bf16 or fp32") from None
            self.dtype = Choice(torch.bfloat16, f"default: float16 would overflow in {overflow.name!r}, so bfloat16")
            for stale in place.iterdir():
                stale.unlink()
            return self._write_weights(place, quantization)

    def check(self, places: dict[str, Path]):
        """(the merge target kept, each target's held-out loss, the kept export's verification). Every model is
        streamed a module at a time (verify/streamed.py), so this needs a few tensors in memory at any model size."""
        targets = self.targets
        if not self.verify:
            return Choice(targets.value[0], targets.reason), {}, None
        from ...verify.verdict import export_loss, verification_rows, verify_merge
        from ...weights.weight_map import config_of

        self.config = config_of(places[targets.value[0]])  # the export's: the base's without quantization_config
        rows = verification_rows(self.run, places[targets.value[0]], self.config, self.rows)
        losses, chosen = {}, Choice(targets.value[0], targets.reason)
        if len(targets.value) > 1:
            losses = {target: export_loss(self._model(place, f"--into {target}"), rows)
                      for target, place in places.items()}
            best = min(losses, key=losses.get)
            chosen = Choice(best, "auto: " + ", ".join(f"{t} {v:.4f}" for t, v in losses.items()) +
                            f" held-out loss; {best} kept")
        on_4bit = chosen.value == "dequantized"
        where = "4-bit" if on_4bit else "full-precision"
        return chosen, losses, verify_merge(
            self._model(places[chosen.value], "the export"),
            self._model(self.base, f"adapter on the {where} base (float32)", self.deltas, on_4bit),
            self._model(self.base, f"the {where} base", None, on_4bit), rows)

    def _model(self, folder: Path, name: str, adapter: LoraDeltas | None = None, on_4bit: bool = False):
        from ..merged_weights import streamed_source

        return streamed_source(folder, name, self.config, adapter, self.quantization if on_4bit else None,
                               self.load_dtype)

    def report(self, chosen: Choice, losses: dict, files: list[str], verification) -> MergeReport:
        run = self.run
        return MergeReport(
            adapter=str(run.path.resolve()), base=str(self.base), into=chosen.value, into_reason=chosen.reason,
            dtype=str(self.dtype.value).removeprefix("torch."), dtype_reason=self.dtype.reason,
            heldout_loss_by_target=losses, files=files, seconds=time.time() - self.started,
            base_quantization=self.quantization.mode,
            recipe_sha256=run.manifest().recipe_sha256 if run.is_run else None, verification=verification)

    def _check_memory(self, entries) -> None:
        """Refused before anything is written when it would not fit (plan/memory.py)."""
        from ...plan import memory

        config = json.loads((self.base / "config.json").read_text(encoding="utf-8"))
        numels = [math.prod(entry.shape) for entry in entries]
        shape = memory.Shape.of_config(config.get("text_config", config), sum(numels), max(numels))
        rows = self.rows if self.verify else None
        fix = "verify on fewer rows (--verify-rows 4) or pass --no-verify" if rows else "free some memory"
        memory.require(memory.for_merge(shape, self.deltas.params, rows, "dequantized" in self.targets.value),
                       "memory", fix)


def _verification_fix(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "merge with --dtype fp16 (3 more mantissa bits keep small updates bf16 rounds away) or --dtype fp32"
    if dtype == torch.float16:
        return "merge with --dtype fp32"
    return "report this with merge_report.json; --no-verify skips the check"


@contextmanager
def _write_limits_as_one_line(max_bytes: int, work: Path):
    """A file system that caps file sizes (FAT32: 4 GB), met while writing the export: one line that says what to
    change (a full disk is OutputFolder.writing's)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise fail("--shard-size", f"a shard of up to {max_bytes:,} bytes is too large for a file in "
                       f"{str(work.parent)!r}", "pass a smaller --shard-size, e.g. 2GB") from None
        raise


def _merge_targets(into: str, quantization: QuantizationSection, verify: bool) -> Choice:
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
        raise fail("--into", f"'dequantized' is not available: {why}", "use --into original or auto")
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


def _check_disk(needed: int, parent: Path) -> None:
    while not parent.exists():  # the nearest folder that exists is on the device the export will be written to
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise fail("--out", f"needs {sizes.show(needed)}, {parent} has {sizes.show(free)} free",
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

    from ...data.tokenize import training_chat_template

    template = training_chat_template(run.recipe().data, AutoTokenizer.from_pretrained(work))
    if template:
        (work / "chat_template.jinja").write_text(template, encoding="utf-8")


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
