"""Trainer callbacks: metrics.jsonl rows as they are logged, and a final evaluation."""
import json
from pathlib import Path

from transformers import TrainerCallback


class MetricsFile(TrainerCallback):
    """One JSON object per log call, appended and closed at once so a crash loses nothing already logged."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class EvaluateAtEnd(TrainerCallback):
    """The last step is always evaluated, so eval_loss describes the saved adapter, whatever eval_steps is."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy != "no" and state.global_step >= state.max_steps:
            control.should_evaluate = True


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def forget_metrics_after(path: Path, step: int) -> None:
    """On resume, rows logged after the checkpoint are logged again by the resumed run: drop the old ones."""
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
