"""Reading GGUF files: a file's tensors as a streamed model's weights, each tensor's shape, and the file's type. Each
tensor is read from the file, dequantized and renamed when a module needs it. The names and the rotary un-permutation
come from transformers' GGUF loader, not from our writer, so the read-back is independent of the code that wrote the
file (a writer bug the reader mirrored would pass unseen)."""
from pathlib import Path

import numpy as np
import torch

from ..errors import fail
from .weight_map import WeightMap, tied_aliases

# lora-tune's --type names -> llama.cpp's file types (the header field general.file_type)
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K",
              "q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M"}  # plain: llama-quantize --pure Q4_K_M / Q5_K_M


def gguf_weight_map(file: Path, config) -> WeightMap:
    """Hugging Face parameter name -> float32 tensor of the GGUF at `file`, for a model of `config`."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
    to_hf = get_gguf_hf_weights_map(model, processor)
    tensors = {to_hf[tensor.name]: tensor for tensor in gguf.GGUFReader(file).tensors if tensor.name in to_hf}

    def read(name: str) -> torch.Tensor:
        """Read from the file, not through the reader's memory map: its pages would stay resident, and a pass over a
        7B q8_0 file held all 7 GB of them (a 9 GB peak)."""
        tensor = tensors[name]
        with open(file, "rb") as handle:
            handle.seek(tensor.data_offset)
            raw = np.fromfile(handle, dtype=tensor.data.dtype, count=tensor.data.size).reshape(tensor.data.shape)
        values = processor.process(gguf.dequantize(raw, tensor.tensor_type), tensor.name).weights
        return torch.from_numpy(np.array(values, dtype=np.float32))

    return WeightMap(list(tensors), read, tied_aliases(config))


def gguf_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a GGUF, in Hugging Face's order ([out, in] for a linear weight; GGUF lists it reversed)."""
    import gguf

    return {tensor.name: [int(n) for n in reversed(tensor.shape)] for tensor in gguf.GGUFReader(file).tensors}


def model_file_type(file: Path, field: str) -> str | None:
    """A model GGUF's type as `lora-tune export --type` names it (f16, bf16, q8_0, q6_k, ...), None for other types
    (an Ollama Q3_K_S, say); refused in one line when it is not a GGUF model llama.cpp's "llama" architecture reads."""
    import gguf

    try:
        fields = gguf.GGUFReader(file).fields
    except (ValueError, OSError) as exc:
        raise fail(field, f"{str(file)!r} is not a GGUF file ({str(exc)[:80]})",
                   "pass a .gguf model file, e.g. one written by lora-tune export") from None
    text = {key: bytes(fields[key].parts[-1]).decode() for key in ("general.architecture", "general.type")
            if key in fields}
    architecture = text.get("general.architecture")
    if architecture != "llama" or text.get("general.type", "model") != "model":
        raise fail(field, f"{str(file)!r} is not a llama-architecture GGUF model (architecture "
                   f"{architecture!r})", "pass the GGUF of the adapter's base model")
    if "general.file_type" not in fields:
        return None
    kinds: dict[int, str] = {}
    for kind, file_type in FILE_TYPES.items():  # the mixes come before the pure types that share their file type
        kinds.setdefault(int(getattr(gguf.LlamaFileType, file_type)), kind)
    return kinds.get(int(fields["general.file_type"].parts[-1][0]))
