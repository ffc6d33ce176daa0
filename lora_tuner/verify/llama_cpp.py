"""GGUF files judged by llama.cpp itself (its Python binding, llama-cpp-python), the code llama.cpp, Ollama and GPT4All
load them with: transformers' GGUF reader ignores fields llama.cpp refuses files over (an unknown pre-tokenizer name),
so only llama.cpp can say a file works there. Optional: without the binding, callers fall back and say so."""
import os
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


def version() -> str | None:
    """llama-cpp-python's version, or None when it is not installed (or does not import on this CPU)."""
    try:
        import llama_cpp  # noqa: F401  (a build for another CPU fails here with an illegal instruction or ImportError)
    except ImportError:
        return None
    return metadata.version("llama-cpp-python")


class Refused(Exception):
    """llama.cpp would not load the file; the message is llama.cpp's own reason."""


@contextmanager
def _stderr_captured():
    """llama.cpp logs to the process's stderr (file descriptor 2): kept out of the user's terminal, and kept for the
    reason when a load fails."""
    with tempfile.TemporaryFile(mode="w+b") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load(file: Path, vocab_only: bool = False, context: int = 512, lora: Path | None = None):
    """The file loaded as llama.cpp loads it (tensors mapped, not read; read whole when a LoRA GGUF is applied over
    it); Refused with llama.cpp's reason."""
    from llama_cpp import Llama

    with _stderr_captured() as log:
        try:
            return Llama(model_path=str(file), vocab_only=vocab_only, logits_all=not vocab_only, n_ctx=context,
                         lora_path=str(lora) if lora else None, verbose=True)
        except (ValueError, RuntimeError):  # a model it refuses; an adapter it refuses
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
            reasons = [line.strip() for line in lines if "error" in line.lower() or "unknown" in line.lower()]
            raise Refused(reasons[0] if reasons else "llama.cpp could not load it") from None


def close(model) -> None:
    """Free a loaded model; llama.cpp logs its buffers as it frees them, kept out of the user's terminal too."""
    with _stderr_captured():
        model.close()


def tokenize(model, text: str) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def response_logits(model, batches: list) -> list:
    """Per batch (verify.scoring.Batch), the [scored tokens, vocab] logits llama.cpp computes as torch tensors, in the
    order verify.scoring gives them. torch is imported here, not above: quantize() runs in a light process."""
    import torch

    found = []
    for batch in batches:
        rows = []
        for ids, scored in batch.examples():  # each example in a context of its own
            if not scored.any():
                continue  # a pad segment
            model.reset()
            with _stderr_captured():
                model.eval(ids.tolist())
            rows.append(torch.from_numpy(model.scores[:len(ids)].copy())[scored])
        found.append(torch.cat(rows))
    return found


def quantize(f16_file: Path, out: Path, kind: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize: what its llama-quantize tool runs, no importance matrix) from
    an f16 GGUF to `kind` ('q8_0', 'q4_0', 'q4_k_m', 'q5_k_m', 'q6_k'): the reference the suite and
    benchmarks/export.py hold lora-tune's own k-quant writer to."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = os.cpu_count() or 1
    with _stderr_captured():
        if llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise Refused(f"llama.cpp could not quantize {f16_file} to {kind}")
