"""A GGUF model file (llama.cpp, GPT4All, Ollama) as an ordinary Hugging Face folder that lora-tune trains on.
transformers reads GGUF itself and dequantizes it; its model then refuses save_pretrained ("quantized with gguf"),
so the weights are moved into a plain model of the same config and saved from there."""
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import about, fail
from ..outputs import OutputFolder


def import_gguf(file: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False) -> Path:
    """A GGUF model file as a Hugging Face folder in `dtype` (its quantized weights dequantized), to train on."""
    with about(file):
        folder, loaded, tokenizer = _read(Path(file), out, dtype, force)
        config = loaded.config
        del config.quantization_config  # the saved folder holds plain dense weights
        with torch.device("meta"):  # no second copy of the weights, and no time spent initialising them
            plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        plain.load_state_dict(loaded.state_dict(), assign=True)
        with folder.writing() as work:
            plain.save_pretrained(work)
            tokenizer.save_pretrained(work)
        return folder.finish()


def _read(file: Path, out: str | Path, dtype: str, force: bool):
    """(the guarded output, the model transformers read from the file, its tokenizer), refused in one line when the
    file is not a complete GGUF transformers reads."""
    if not file.is_file() or _magic(file) != b"GGUF":
        raise fail("FILE", "not a GGUF file", "point at a .gguf model file")
    folder = OutputFolder(out, "--out", "model", {"GGUF file": file})
    folder.check_free(force)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as exc:  # any failure to parse a file the user named means: not a GGUF transformers can read
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise fail("FILE", f"transformers cannot read this GGUF ({reason})", "use a complete GGUF of an "
                   "architecture transformers supports (LLaMA, Mistral, Qwen2, GPT-2, ...); pip install gguf if it is "
                   "missing") from None
    _check_complete(file, loaded)
    return folder, loaded, tokenizer


def _check_complete(file: Path, loaded) -> None:
    """transformers fills weights a GGUF lacks with random values, silently: every parameter must come from the
    file (read through transformers' own GGUF name map)."""
    from ..weights.gguf import gguf_weight_map

    weights = gguf_weight_map(file, loaded.config)
    missing = [name for name, _ in loaded.named_parameters() if name not in weights]
    if missing:
        raise fail("FILE", f"{len(missing)} of the model's weights are not in the file (first: "
                   f"{missing[0]!r}), so they would be random", "use a complete GGUF of this model")


def _magic(file: Path) -> bytes:
    with file.open("rb") as handle:
        return handle.read(4)
