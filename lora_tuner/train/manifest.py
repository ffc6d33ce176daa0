"""The parts of run.json: versions, the machine, the data and loss records, pins (TrainingRun assembles them)."""
import hashlib
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ..config import Recipe
from ..data.prepare import PreparedData
from ..model.dtypes import native_dtype
from ..run_folder import DataRecord, LossRecord, PinRecord
from ..weights.fingerprint import fingerprint

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
    """The lora-tune source commit, when it runs from a checkout; '-dirty' after it when tracked files differ from
    it (a run or benchmark of uncommitted code)."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 1 else "")


def device() -> str:
    """The machine, with what decides its speed: the GPU, or the CPU's model and whether it computes bf16 natively
    (CPUs of one cloud instance type differ in that, and bf16 matmuls are then ~2x or ~1/70 of fp32)."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu: {_cpu_model()}, {native_dtype()[1]}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def pin(adapter: str | None) -> PinRecord | None:
    """The start adapter as the run read it: resolved, fingerprinted (eval measures against exactly this one)."""
    if adapter is None:
        return None
    folder = Path(adapter).expanduser().resolve()
    return PinRecord(path=str(folder), fingerprint=fingerprint(folder))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def data_record(recipe: Recipe, data: PreparedData) -> DataRecord:
    return DataRecord(path=recipe.data.path, sha256=data.sha256, rows_read=data.rows_read, train_rows=len(data.train),
                      eval_rows=len(data.eval), dropped_rows=sum(len(rows) for rows in data.dropped.values()),
                      dropped=data.dropped)


def loss_record(metrics: list[dict]) -> LossRecord:
    """First and last training loss, and the validation loss before the first step and at the end."""
    losses = [row["loss"] for row in metrics if "loss" in row]
    evals = [(row["step"], row["eval_loss"]) for row in metrics if "eval_loss" in row]
    return LossRecord(first=losses[0] if losses else None, last=losses[-1] if losses else None,
                      eval_start=evals[0][1] if evals and evals[0][0] == 0 else None,
                      eval=evals[-1][1] if evals else None)
