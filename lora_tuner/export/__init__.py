"""Merge and export, by format: safetensors/ (`lora-tune merge`: standalone Hugging Face weights) and gguf/ (one file
for llama.cpp, Ollama and GPT4All, or the adapter alone as a LoRA GGUF). Each writes, then verifies through verify/.
Shared by both: the adapter as deltas (lora_deltas), the merged tensors streamed from the base (merged_weights), what
an export reads besides the adapter (inputs), and the reports."""
from pathlib import Path

from .gguf.export import export_gguf
from .gguf.lora import export_gguf_lora
from .report import ExportReport
from .safetensors.merge import merge

__all__ = ["export", "export_gguf", "export_gguf_lora", "merge"]


def export(source: str | Path, out: str | Path, format: str = "gguf", kind: str | None = None,
           base_gguf: str | Path | None = None, into: str = "auto", verify: bool = True,
           verify_rows: int | None = None, force: bool = False) -> ExportReport:
    """`lora-tune export`: a run or merged export as one GGUF file, or (format "gguf-lora") the adapter alone.

    Args:
        source: a run folder or merged export (gguf); a run or PEFT adapter folder (gguf-lora).
        out: the .gguf file; its Ollama Modelfile and export report land beside it.
        format: "gguf" (the merged model) or "gguf-lora" (the adapter alone, applied over `base_gguf`).
        kind: the GGUF type (default q8_0; gguf-lora writes f16).
        base_gguf: gguf-lora: the base model's GGUF.
        into: for a QLoRA run, what the adapter is merged into (as merge's `into`).
        verify: load the file and compare it on held-out rows (in llama.cpp where installed).
        verify_rows: how many rows to verify on (default 16).
        force: replace an existing `out` and the files beside it.

    Example:
        export("adapters/smollm2-135m-alpaca", "smollm2-alpaca.gguf", kind="q4_k_m")
    """
    from ..errors import about, fail

    with about(source):
        if format == "gguf-lora":
            if kind not in (None, "f16"):
                raise fail("--type", f"{kind!r}: gguf-lora writes f16 (a LoRA B's rows are `rank` values long, "
                           "shorter than a quantization block)", "leave --type out")
            return export_gguf_lora(source, out, base_gguf, verify=verify, verify_rows=verify_rows, force=force)
        if format != "gguf":
            raise fail("--format", f"{format!r} is not an export format", "use gguf or gguf-lora (safetensors: merge)")
        if base_gguf is not None:
            raise fail("--base-gguf", "is for --format gguf-lora", "add --format gguf-lora, or leave --base-gguf out")
        return export_gguf(source, out, kind=kind or "q8_0", into=into, verify=verify, verify_rows=verify_rows,
                           force=force)
