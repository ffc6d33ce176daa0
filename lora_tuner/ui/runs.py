"""The runs under an adapters folder as the page shows them: each one's state and headline figures read from the folder
itself, through the run folder's one tolerant reader (RunFolder), finished or not. A run whose files cannot be read
(a corrupt run.json, a link out of the folder, a folder name that is not UTF-8) is listed as damaged, with the reason,
and never stops the list, the page or any other run.

A finished run is `ROOT/NAME` with its run.json. An unfinished one is `ROOT/.NAME.partial` (outputs.py): it
is running while a process holds its process.json lock, stopped when it has a sealed checkpoint to resume from, and
failed when it has neither."""
import math
from pathlib import Path

from ..errors import UserError
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
        elif (path / RunFolder.MANIFEST).exists() or (path / RunFolder.RECIPE).exists():
            found[path.name] = RunFolder(path)
    return found


def healthy(folder: RunFolder) -> bool:
    """A finished run whose files read back: one the playground can serve."""
    return folder.is_run and listed(folder.path.name, folder)["state"] == "finished"


def state(folder: RunFolder) -> str:
    if folder.is_run:
        return "finished"
    if folder.is_training:
        return "running"
    return "stopped" if folder.newest_sealed_checkpoint(lambda message: None) else "failed"


def shown_name(name: str) -> str:
    """A folder name as JSON can carry it: bytes that are not UTF-8 shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def listed(name: str, folder: RunFolder) -> dict:
    """One row of the runs table: the run's figures, or a damaged row saying why."""
    try:
        if shown_name(name) != name:
            raise folder.damaged("(folder name)", "is not UTF-8", "rename the folder")
        folder.check_files()
        return summary(name, folder)
    except UserError as exc:
        return damaged_row(shown_name(name), exc)


def damaged_row(name: str, exc: UserError) -> dict:
    problem = exc.problems[0]
    return {"name": name, "state": "damaged", "problem": f"{problem.field}: {problem.message}; {problem.fix}",
            "base": "", "method": "", "steps": None, "max_steps": None, "tokens_per_s": None, "train_loss": None,
            "validation_loss": None, "eval": None}


def summary(name: str, folder: RunFolder) -> dict:
    """One row of the runs table (raises UserError for a damaged run)."""
    recipe = folder.recipe()
    metrics = folder.metrics()
    losses = [row for row in metrics if "loss" in row]
    evals = [row for row in metrics if "eval_loss" in row]
    manifest = folder.manifest() if folder.is_run else None
    speeds = [row["train_tokens_per_second"] for row in metrics if "train_tokens_per_second" in row]
    return finite({
        "name": name,
        "state": state(folder),
        "base": manifest.base_model.name_or_path if manifest else recipe.model.name_or_path or "random (model.config)",
        "method": recipe.train.method,
        "steps": manifest.train.steps if manifest else max((_int(row.get("step")) for row in metrics), default=0),
        "max_steps": recipe.train.max_steps,
        "tokens_per_s": manifest.train.tokens_per_s if manifest else (speeds[-1] if speeds else None),
        "train_loss": losses[-1]["loss"] if losses else None,
        "validation_loss": evals[-1]["eval_loss"] if evals else None,
        "eval": _held_out(folder),
    })


def detail(name: str, folder: RunFolder) -> dict:
    """Everything the run page shows but the metrics, which it polls (metrics())."""
    try:
        folder.check_files()
        manifest = folder.manifest() if folder.is_run else None
        return finite({
            **summary(name, folder),
            "recipe": folder.recipe_text(),
            "fast_path": manifest.fast_path if manifest else [],
            "dropped": manifest.data.dropped if manifest else {},
            "data": manifest.data.model_dump(exclude={"dropped"}) if manifest else None,
            "eval_report": folder.read_json(RunFolder.EVAL_JSON),
            "eval_md": folder.read_text(RunFolder.EVAL_MD),
        })
    except UserError as exc:
        return {**damaged_row(name, exc), "recipe": None, "fast_path": [], "dropped": {}, "data": None,
                "eval_report": None, "eval_md": None}


def metrics(folder: RunFolder, since: int) -> dict:
    """Rows after the first `since` (the page polls this while a run trains: metrics.jsonl only grows), how many a
    torn last line cost, and the run's state."""
    try:
        folder.check_files()
        lines = folder.read_jsonl(RunFolder.METRICS)
    except UserError as exc:
        return {**damaged_row(folder.path.name, exc), "rows": [], "count": 0, "torn": 0}
    return finite({"rows": lines.rows[max(since, 0):], "count": len(lines.rows), "torn": lines.torn,
                   "state": state(folder)})


def _held_out(folder: RunFolder) -> dict | None:
    """The adapter's line of eval.json: held-out loss, and preference accuracy for a preference run."""
    report = folder.read_json(RunFolder.EVAL_JSON)
    models = report.get("models") if isinstance(report, dict) else None
    if not isinstance(models, list):
        return None
    adapter = next((m for m in models if isinstance(m, dict) and m.get("name") == "base + adapter"), None)
    return None if adapter is None else {"loss": adapter.get("loss"), "preference_accuracy": adapter.get(
        "preference_accuracy")}


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def finite(value):
    """JSON the page can parse: NaN and infinities (a diverged run logs them) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value
