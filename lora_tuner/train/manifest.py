"""run.json: what is needed to reproduce or audit a run."""
import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ..config import dump_recipe

PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "lora-tune")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The lora-tune source commit, when it runs from a checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def device() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def command_line() -> str:
    return " ".join(sys.argv)


def run_manifest(recipe, source, data, trainer, result, metrics, base_path, started) -> dict:
    """Everything run.json records but the fast-path choices, resume point and world size (added by the caller)."""
    losses = [row["loss"] for row in metrics if "loss" in row]
    evals = [row["eval_loss"] for row in metrics if "eval_loss" in row]
    runtime = result.metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "name": recipe.output.name,
        "recipe": source,
        "recipe_sha256": hashlib.sha256(dump_recipe(recipe).encode()).hexdigest(),
        "command": command_line(),
        "versions": versions(),
        "git_commit": git_commit(),
        "seed": recipe.train.seed,
        "base_model": {
            "name_or_path": base_path,
            "revision": recipe.model.revision,
            "init": recipe.model.init,
            "quantization": recipe.quantization.model_dump(),
        },
        "data": {
            "path": recipe.data.path,
            "sha256": data.sha256,
            "rows_read": data.rows_read,
            "train_rows": len(data.train),
            "eval_rows": len(data.eval) if data.eval is not None else 0,
            "dropped_rows": sum(len(rows) for rows in data.dropped.values()),
            "dropped": data.dropped,
        },
        "train": {
            "steps": trainer.state.global_step,
            "tokens": tokens,
            "runtime_s": runtime,
            "tokens_per_s": tokens / runtime if runtime else 0.0,
        },
        "loss": {"first": losses[0], "last": losses[-1], "eval": evals[-1] if evals else None},
        "device": device(),
        "started_at": started,
        "finished_at": now(),
    }
