"""The runs under an adapters folder as the page shows them: each one's state and headline figures read from the folder
itself (RunFolder), finished or not.

A finished run is `ROOT/NAME` with its run.json. An unfinished one is `ROOT/.NAME.partial` (atomic_folder.py): it
is running while a process holds its process.json lock, stopped when it has a sealed checkpoint to resume from, and
failed when it has neither."""
import json
from pathlib import Path

from ..run_folder import RunFolder

PARTIAL = (".", ".partial")  # prefix and suffix of an unfinished run's folder


def run_folders(root: Path) -> dict[str, RunFolder]:
    """name -> folder of every run under root; a finished run wins over a stale unfinished one of the same name."""
    found = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir():
            continue
        if path.name.startswith(PARTIAL[0]) and path.name.endswith(PARTIAL[1]):
            name = path.name[len(PARTIAL[0]):-len(PARTIAL[1])]
            if (path / RunFolder.RECIPE).is_file():
                found.setdefault(name, RunFolder(path))
        elif RunFolder(path).is_run:
            found[path.name] = RunFolder(path)
    return found


def state(folder: RunFolder) -> str:
    if folder.is_run:
        return "finished"
    if folder.is_training:
        return "running"
    return "stopped" if folder.newest_sealed_checkpoint(lambda message: None) else "failed"


def summary(name: str, folder: RunFolder) -> dict:
    """One row of the runs table."""
    recipe = folder.recipe()
    metrics = folder.metrics()
    losses = [row for row in metrics if "loss" in row]
    evals = [row for row in metrics if "eval_loss" in row]
    manifest = folder.manifest() if folder.is_run else None
    speeds = [row["train_tokens_per_second"] for row in metrics if "train_tokens_per_second" in row]
    return {
        "name": name,
        "state": state(folder),
        "base": manifest.base_model.name_or_path if manifest else recipe.model.name_or_path or "random (model.config)",
        "method": recipe.train.method,
        "steps": manifest.train.steps if manifest else max((row["step"] for row in metrics), default=0),
        "max_steps": recipe.train.max_steps,
        "tokens_per_s": manifest.train.tokens_per_s if manifest else (speeds[-1] if speeds else None),
        "train_loss": losses[-1]["loss"] if losses else None,
        "validation_loss": evals[-1]["eval_loss"] if evals else None,
        "eval": _held_out(folder),
    }


def detail(name: str, folder: RunFolder) -> dict:
    """Everything the run page shows but the metrics, which it polls (metrics())."""
    manifest = folder.manifest() if folder.is_run else None
    eval_md = folder / RunFolder.EVAL_MD
    return {
        **summary(name, folder),
        "recipe": folder.recipe_text(),
        "fast_path": manifest.fast_path if manifest else [],
        "dropped": manifest.data.dropped if manifest else {},
        "data": manifest.data.model_dump(exclude={"dropped"}) if manifest else None,
        "eval_report": _eval_json(folder),
        "eval_md": eval_md.read_text(encoding="utf-8") if eval_md.is_file() else None,
    }


def _eval_json(folder: RunFolder) -> dict | None:
    path = folder / RunFolder.EVAL_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:  # written atomically by eval, so only a foreign file gets here
        return None


def _held_out(folder: RunFolder) -> dict | None:
    """The adapter's line of eval.json: held-out loss, and preference accuracy for a preference run."""
    report = _eval_json(folder)
    if report is None:
        return None
    adapter = next((m for m in report["models"] if m["name"] == "base + adapter"), None)
    return None if adapter is None else {"loss": adapter["loss"], "preference_accuracy": adapter.get(
        "preference_accuracy")}
