"""Trainer callbacks: metrics.jsonl rows as they are logged, and a final evaluation."""
from transformers import TrainerCallback

from ..run_folder import RunFolder


class MetricsFile(TrainerCallback):
    """One JSON object per log call in the run folder's metrics.jsonl."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.folder.append_metrics({"step": state.global_step, **logs})


class EvaluateAtEnd(TrainerCallback):
    """The last step is always evaluated, so eval_loss describes the saved adapter, whatever eval_steps is."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy != "no" and state.global_step >= state.max_steps:
            control.should_evaluate = True
