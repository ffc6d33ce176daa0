"""Prove an export by what users care about: on the run's held-out rows, the export (loaded with plain transformers)
must pick the adapter's most likely tokens, stay close to its distribution, and keep the loss gain the adapter has
over its base. A max-logit ratio is not used: 30 real layers rounding every weight to 16 bits exceed any useful one
while the model is as good as before.

The reference is the adapter on its base computed in float32, the exact model the adapter defines. Thresholds,
from SmolLM2-135M (bf16 base, a 20-step r16 all-linear run, 16 held-out rows, 949 response tokens): a float32 export
agrees on 100% of top-1 tokens (KL 2e-9), float16 on 99.9% (KL 2e-5), both keeping 100.0% of the gain; bfloat16
agrees on 96.6% (KL 7e-3) and keeps 92.3% of it, so it fails, as a merge of the wrong rows would by far more."""
from pathlib import Path

import torch

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config.schema import ModelSection, QuantizationSection
from ..eval.scoring import Batch, agreement, batches, loss, reference_logits, tokenized_rows
from ..model.loading import load_base
from ..run_folder import RunFolder
from .report import Verification

MIN_TOP1 = 0.99
MAX_KL = 1e-3
MIN_GAIN_KEPT = 0.99
GAIN_MEASURABLE = 0.02  # nats: below this the adapter barely moved the loss, and the gap is judged instead
MAX_LOSS_GAP = 0.005  # nats, for such adapters
ROWS, MAX_LENGTH = 16, 256
FALLBACK = ["Below is an instruction that describes a task.", "The quick brown fox jumps over the lazy dog.",
            "def fibonacci(n):", "Write a short poem about the sea."]


def verification_rows(run: RunFolder, export_folder: Path, rows: int = ROWS) -> tuple[list[Batch], int, bool]:
    """(batches, row count, held out) from the rows the run stored; fixed text for a bare PEFT adapter."""
    examples, held_out = run.validation()
    if not examples:
        examples, held_out = [{"prompt": "", "completion": text} for text in FALLBACK], False
    tokenizer = AutoTokenizer.from_pretrained(export_folder)
    max_length = run.recipe().data.max_length if run.is_run else MAX_LENGTH
    tokenized = tokenized_rows(tokenizer, examples[:rows], min(max_length, MAX_LENGTH))
    return batches(tokenized, tokenizer.pad_token_id or 0), len(tokenized), held_out


def load_export(folder: Path):
    """The export as stored, except fp16 on a CPU, which is computed in float32: every fp16 value is exactly a
    float32 value, and CPUs without fp16 arithmetic emulate it ~7x slower (measured on SmolLM2: 12 s a batch
    against 1.7 s). What is judged is the stored weights."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    return model.float() if model.dtype == torch.float16 and model.device.type == "cpu" else model


def reference_model(base_folder: Path, adapter: Path, quantization: QuantizationSection | None, source: str):
    """The adapter on its base (4-bit with `quantization`, as training saw it), computed in float32: the exact
    model the adapter defines. In bf16 arithmetic the adapter itself is as far from it as a float32 merge is."""
    quantized = quantization.model_copy(update={"compute_dtype": "float32"}) if quantization else QuantizationSection()
    base = load_base(ModelSection(name_or_path=str(base_folder), dtype="float32"), quantized, str(base_folder), source)
    return PeftModel.from_pretrained(base, adapter).eval()


def export_loss(folder: Path, rows: list[Batch], label: str) -> float:
    return loss(load_export(folder), rows, desc=f"scoring {label}")


def verify(export_folder: Path, reference, rows: list[Batch], row_count: int, held_out: bool,
           reference_name: str) -> Verification:
    want = reference_logits(reference, rows, desc="scoring the adapter")
    with reference.disable_adapter():
        base_loss = loss(reference, rows, desc="scoring the base")
    del reference  # callers pass their only reference: freed before the export loads, one float32 model at a time
    found = agreement(load_export(export_folder), want, rows, desc="verifying")
    gain = base_loss - found.reference_loss
    kept = (base_loss - found.loss) / gain if gain >= GAIN_MEASURABLE else None
    if kept is not None:
        loss_ok, loss_why = kept >= MIN_GAIN_KEPT, f"keeps {kept:.1%} of the adapter's loss gain (>= {MIN_GAIN_KEPT:.0%})"
    else:
        gap = found.loss - found.reference_loss
        loss_ok, loss_why = gap <= MAX_LOSS_GAP, f"loss {gap:+.4f} from the adapter's (<= {MAX_LOSS_GAP})"
    checks = [(found.top1_agreement >= MIN_TOP1, f"top-1 agreement {found.top1_agreement:.1%} (>= {MIN_TOP1:.0%})"),
              (found.mean_kl <= MAX_KL, f"mean KL {found.mean_kl:.2e} (<= {MAX_KL})"), (loss_ok, loss_why)]
    failed = [why for ok, why in checks if not ok]
    return Verification(
        reference=reference_name, rows=row_count, held_out=held_out, tokens=found.tokens,
        top1_agreement=found.top1_agreement, mean_kl=found.mean_kl, max_abs_logit_diff=found.max_abs_logit_diff,
        loss_export=found.loss, loss_adapter=found.reference_loss, loss_base=base_loss, gain_kept=kept,
        passed=not failed, why="; ".join(failed or [why for _, why in checks]))
