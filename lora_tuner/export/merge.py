"""`lora-tune merge`: fold an adapter into its base as standalone weights, safely, and prove the result."""
import errno
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..atomic_folder import AtomicFolder
from ..config import load_recipe
from ..config.schema import QuantizationSection, Recipe
from ..errors import fail
from .base_reader import base_shards, plan_entries
from .lora_deltas import LoraDeltas
from .model_card import model_card
from .streaming import stream_merge

# transformers and peft are imported only by the steps that need them (4-bit round trip, verification):
# a --no-verify merge of a 16-bit adapter is pure tensor streaming and should not pay seconds of imports.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def merge(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str | None = None,
          into: str | None = None, shard_size: str | int = "5GB", force: bool = False, verify: bool = True) -> dict:
    """Merge ADAPTER (a run folder or PEFT adapter folder) into its base and write standalone weights to OUT.
    Returns the merge report (also written to OUT/merge_report.json)."""
    started = time.time()
    adapter = Path(adapter)
    source = str(adapter)
    deltas = LoraDeltas(adapter, source)
    recipe = _run_recipe(adapter)
    quantization = recipe.quantization if recipe else QuantizationSection()
    base_folder = _base_folder(base, adapter, deltas, source)
    into = _merge_target(into, quantization, source)
    out_dtype = _out_dtype(dtype, recipe, base_folder)
    entries = plan_entries(base_shards(base_folder, source), out_dtype, source)
    _check_fit(deltas, entries, base_folder, source)

    folder = AtomicFolder(Path(out), source, field="--out", what="model export")
    folder.check_free(force)
    _check_disk(sum(e.nbytes for e in entries), folder.final.parent, source)
    max_bytes = _max_bytes(shard_size, source)
    work = folder.start()
    with _write_limits_as_one_line(work, max_bytes, source):
        files = stream_merge(deltas, entries, work, out_dtype, max_bytes,
                             quantization if into == "dequantized" else None, base_folder, recipe)
        _copy_side_files(base_folder, adapter, work, out_dtype)
        report = {
            "adapter": str(adapter.resolve()), "base": str(base_folder), "into": into,
            "dtype": str(out_dtype).removeprefix("torch."), "files": files, "seconds": 0.0,
            "base_quantization": quantization.mode, "recipe_sha256": _run_manifest(adapter).get("recipe_sha256"),
        }
        if verify:
            from .verify import verify_export

            report["verification"] = verify_export(work, base_folder, adapter, recipe, quantization, into, out_dtype,
                                                   source)
        report["seconds"] = time.time() - started
        (work / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (work / "README.md").write_text(model_card(report), encoding="utf-8")
    if verify and not report["verification"]["passed"]:
        v = report["verification"]
        raise fail(source, "verification", f"merged logits differ by {v['max_abs_logit_diff']:.3g} "
                   f"({v['relative_diff']:.2e} of max |logit| > {v['tolerance']:.0e}); the export is kept in "
                   f"{str(work)!r}, not put in place", "report this with merge_report.json; --no-verify skips the check")
    folder.finish()
    return report


@contextmanager
def _write_limits_as_one_line(work: Path, max_bytes: int, source: str):
    """A full disk, or a file system that caps file sizes (FAT32: 4 GB), met while writing the export: one line that
    says what to change, and the unfinished export stays out of place."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise fail(source, "--out", f"no space left on the device of {str(work.parent)!r}; the unfinished export "
                       f"is in {str(work)!r}", "free some space, then run again with --force") from None
        if exc.errno == errno.EFBIG:
            raise fail(source, "--shard-size", f"a shard of up to {max_bytes:,} bytes is too large for a file in "
                       f"{str(work.parent)!r}", "pass a smaller --shard-size, e.g. 2GB") from None
        raise


def _run_recipe(adapter: Path) -> Recipe | None:
    """The recipe a lora-tune run folder saved; None for a plain PEFT adapter folder."""
    path = adapter / "recipe.yaml"
    return load_recipe(path) if path.is_file() else None


def _run_manifest(adapter: Path) -> dict:
    path = adapter / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _base_folder(base: str | None, adapter: Path, deltas: LoraDeltas, source: str) -> Path:
    name = base or _run_manifest(adapter).get("base_model", {}).get("name_or_path") \
        or deltas.config.get("base_model_name_or_path")
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


def _merge_target(into: str | None, quantization: QuantizationSection, source: str) -> str:
    if into is None:
        return "dequantized" if quantization.mode == "4bit" else "original"
    if into == "dequantized" and quantization.mode != "4bit":
        why = ("8-bit matmuls keep outlier columns in 16-bit, so no single dequantized weight exists"
               if quantization.mode == "8bit" else "the adapter was trained on an unquantized base")
        raise fail(source, "--into", f"'dequantized' is not available: {why}", "use --into original")
    return into


def _out_dtype(dtype: str | None, recipe: Recipe | None, base_folder: Path) -> torch.dtype:
    if dtype:
        return DTYPES[dtype]
    if recipe:
        return getattr(torch, recipe.model.dtype)
    config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")


def _check_fit(deltas: LoraDeltas, entries, base_folder: Path, source: str) -> None:
    """Every adapted weight must exist in the base with the delta's shape, or the merge would be wrong."""
    shapes = {entry.name: list(entry.shape) for entry in entries}
    for key in sorted(deltas.targets):
        if key not in shapes:
            raise fail(source, "adapter", f"targets {key!r}, which base {str(base_folder)!r} does not have",
                       "pass the --base this adapter was trained on")
        if deltas.delta_shape(key) != shapes[key]:
            raise fail(source, "adapter", f"{key!r} is {deltas.delta_shape(key)} in the adapter but {shapes[key]} in "
                       f"base {str(base_folder)!r}", "pass the --base this adapter was trained on")


def _check_disk(needed: int, parent: Path, source: str) -> None:
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise fail(source, "--out", f"needs {needed / 2**30:.1f} GiB, {parent} has {free / 2**30:.1f} GiB free",
                   "free some space or choose another --out")


def _max_bytes(shard_size: str | int, source: str) -> int:
    if isinstance(shard_size, int):
        return shard_size
    text = shard_size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise fail(source, "--shard-size", f"{shard_size!r} is not a size", "write e.g. 5GB or 500MB")


def _copy_side_files(base_folder: Path, adapter: Path, work: Path, out_dtype: torch.dtype) -> None:
    config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # the export is plain dense weights
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (base_folder / "generation_config.json").is_file():
        shutil.copy2(base_folder / "generation_config.json", work)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base_folder
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy2(tokenizer_source / name, work)
