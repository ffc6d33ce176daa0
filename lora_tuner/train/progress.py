"""What a long run shows as it goes: a step bar, and at each logging step one readable line with the loss, the token
accuracy, real tokens per second of training (evaluations and checkpoints not counted) and the time left. Replaces
transformers' ProgressCallback, which prints raw log dicts."""
import time

from tqdm.auto import tqdm
from transformers import TrainerCallback


class Progress(TrainerCallback):
    def __init__(self):
        self.train_seconds = 0.0  # inside optimizer steps, this session
        self.session_tokens = 0
        self._bar = self._eval_bar = None
        self._step_started = self._tokens_at_start = self._steps_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_start, self._steps_at_start = state.num_input_tokens_seen, state.global_step
        if state.is_world_process_zero:
            self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_started
        self.session_tokens = state.num_input_tokens_seen - self._tokens_at_start
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._bar is None or not logs:
            return
        if "loss" in logs:
            done = state.global_step - self._steps_at_start
            rate = self.session_tokens / self.train_seconds if self.train_seconds else 0.0
            left = (state.max_steps - state.global_step) * self.train_seconds / max(done, 1)
            accuracy = f"  token accuracy {logs['token_accuracy']:.3f}" if "token_accuracy" in logs else ""
            self._bar.write(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}{accuracy}  "
                            f"{rate:,.0f} tokens/s  about {_duration(left)} left")
        if "eval_loss" in logs:
            self._bar.write(f"step {state.global_step}/{state.max_steps}  validation loss {logs['eval_loss']:.4f}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and eval_dataloader is not None:
            if self._eval_bar is None:
                self._eval_bar = tqdm(total=len(eval_dataloader), desc="validation", unit="batch", leave=False)
            self._eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
