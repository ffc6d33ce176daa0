"""The GGUF writer: a merged LLaMA-family model as one .gguf file for llama.cpp, Ollama and GPT4All, written with
the `gguf` package (llama.cpp's own Python library) one tensor at a time, so no llama.cpp build is needed. This module
decides each tensor's name and type; vocabulary.py writes the tokenizer.

What llama.cpp expects and its converter does, done here too: Q and K projection rows permuted into the rotary
layout llama.cpp computes with; a tied output head not written (llama.cpp reuses token_embd); 1-D tensors (norms)
kept in F32; with q4_0, the embedding and output head in q8_0 (they are the most sensitive); k-quant mixes as
llama-quantize chooses them."""
import json
from pathlib import Path

import numpy as np
import torch

from ...errors import fail
from ...weights.gguf import FILE_TYPES
from ..merged_weights import MergedWeights
from . import kquants
from .vocabulary import GgufVocabulary

# --type -> the type of the weight matrices; a k-quant mix (_m) moves some to Q6_K as llama-quantize does (_k_type)
TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K",
         "q6_k": "Q6_K", "q4_k": "Q4_K", "q5_k": "Q5_K"}
MIXES = ("q4_k_m", "q5_k_m", "q6_k")  # llama-quantize's per-tensor rules apply (llama-quant.cpp)
# A k-quant's rows are whole 256-value blocks; llama.cpp falls back to these for rows that are not (tensor_type_fallback)
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # LLaMA 1/2/3, Mistral, SmolLM: llama.cpp's "llama"
SENSITIVE = ("token_embd.weight", "output.weight")  # kept at q8_0 in a q4_0 file


class GgufExporter:
    def __init__(self, model_folder: Path, kind: str, model_name: str):
        """model_folder: the merged model (config.json and tokenizer files); kind: one of TYPES; model_name: the
        general.name llama.cpp and Ollama show (the run's, not a temporary folder's)."""
        import gguf

        self.gguf, self.folder, self.kind, self.model_name = gguf, model_folder, kind, model_name
        self.has_chat_template = False
        self.config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
        architecture = (self.config.get("architectures") or ["?"])[0]
        if architecture not in ARCHITECTURES:
            raise fail("--format", f"gguf export of {architecture} is not supported",
                       "gguf export covers LLaMA-family models (LLaMA 1/2/3, Mistral, SmolLM); for others run "
                       "llama.cpp's convert_hf_to_gguf.py on a `lora-tune merge` export")
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", "linear"):
            raise fail("--format", f"rope type {rope['rope_type']!r} is not supported by the gguf export",
                       "convert the `lora-tune merge` export with llama.cpp's convert_hf_to_gguf.py")
        # built once: gguf builds this map from its tables on every call (~9 ms, 2 s over a 1B model's tensors)
        self.names = gguf.tensor_mapping.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.config["num_hidden_layers"])

    def write(self, weights: MergedWeights, path: Path) -> list[str]:
        from tqdm.auto import tqdm

        writer = self.gguf.GGUFWriter(path, "llama")
        self._metadata(writer)
        vocabulary = GgufVocabulary(self.folder, self.config["vocab_size"])
        vocabulary.write(writer)
        self.has_chat_template = vocabulary.has_chat_template
        planned = []
        for entry in weights.entries:
            name = self.tensor_name(entry.name)
            if name is None:
                continue
            kind = self._type(name, entry.shape)
            shape = self.gguf.quants.quant_shape_to_byte_shape(entry.shape, kind) if _quantized(kind) else entry.shape
            dtype = np.uint8 if _quantized(kind) else (np.float32 if kind.name == "F32" else np.float16)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=kind)
            planned.append((entry, name, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry, name, kind in tqdm(planned, desc=f"writing gguf {self.kind}", unit="tensor"):
            writer.write_tensor_data(self._encode(weights.tensor(entry), name, kind))
        writer.close()
        return [path.name]

    # metadata
    def _metadata(self, writer) -> None:
        c = self.config
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        rope = c.get("rope_parameters") or {}
        writer.add_name(self.model_name)
        writer.add_context_length(c["max_position_embeddings"])
        writer.add_embedding_length(c["hidden_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(c.get("num_key_value_heads") or heads)
        if head_dim != c["hidden_size"] // heads:  # attention narrower or wider than the model (Mistral NeMo)
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(self.gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(c["vocab_size"])
        writer.add_file_type(getattr(self.gguf.LlamaFileType, FILE_TYPES[self.kind]))
        writer.add_quantization_version(self.gguf.GGML_QUANT_VERSION)

    # tensors
    def tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for what llama.cpp does not read (a tied head, rotary caches)."""
        if hf_name == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            return None
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise fail("--format", f"{hf_name!r} has no place in a llama GGUF",
                       "export a plain LLaMA-family model (no extra modules)")
        return name

    def _type(self, name: str, shape: list[int]):
        """F32 for 1-D tensors, else the requested type (q8_0 for the sensitive ones in q4_0, llama-quantize's choices
        in a k-quant mix); a row that is not a whole number of quantization blocks falls back as llama.cpp does."""
        types = self.gguf.GGMLQuantizationType
        if len(shape) < 2:
            return types.F32
        if TYPES[self.kind] in K_FALLBACK:
            wanted = getattr(types, self._k_type(name, shape[-1]))
            if wanted.name in K_FALLBACK and shape[-1] % kquants.QK_K:
                wanted = getattr(types, K_FALLBACK[wanted.name])
        else:
            wanted = types.Q8_0 if self.kind == "q4_0" and name in SENSITIVE else getattr(types, TYPES[self.kind])
        block = self.gguf.GGML_QUANT_SIZES[wanted][0]
        return wanted if shape[-1] % block == 0 else types.F16

    def _k_type(self, name: str, row: int) -> str:
        """llama-quantize's type for one tensor of a LLaMA model (llama_tensor_get_type_impl, no importance matrix): in
        the mixes, the output head (or the tied embedding that serves as one) in Q6_K (Q8_0 when its rows are not
        whole blocks), and in Q4_K_M / Q5_K_M the V projections and FFN down projections of the layers
        `_more_bits` picks in Q6_K."""
        default = TYPES[self.kind]
        if self.kind not in MIXES:
            return default
        head = name == "output.weight" or (name == "token_embd.weight" and self.config.get("tie_word_embeddings"))
        if head:
            return "Q8_0" if row % kquants.QK_K else "Q6_K"
        if name.endswith(("attn_v.weight", "ffn_down.weight")) and self.kind != "q6_k":
            layer = int(name.split(".")[1])
            return "Q6_K" if _more_bits(layer, self.config["num_hidden_layers"]) else default
        return default

    def rotary_layout(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of the weight (or of a LoRA B, whose rows are the weight's) named `name` in llama.cpp's order."""
        heads, kv_heads = self.config["num_attention_heads"], self.config.get("num_key_value_heads")
        if name.endswith("attn_q.weight"):
            return rotary_permute(tensor, heads)
        if name.endswith("attn_k.weight"):
            return rotary_permute(tensor, kv_heads or heads)
        return tensor

    def _encode(self, tensor: torch.Tensor, name: str, kind) -> np.ndarray:
        tensor = self.rotary_layout(tensor, name)
        if kind.name in ("F32", "F16"):  # torch converts ~8x faster than numpy's astype (vectorised, threaded)
            return tensor.to(torch.float32 if kind.name == "F32" else torch.float16).numpy()
        if kind.name in kquants.BYTES:
            return kquants.quantize(tensor.float().numpy(), kind.name, threads=torch.get_num_threads())
        return self.gguf.quants.quantize(tensor.float().numpy(), kind)


def rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face stores each head's rotary pairs as two halves (rotate_half); llama.cpp's rope wants them
    interleaved: within each head, rows (i, i + d/2) become rows (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _quantized(kind) -> bool:
    return kind.name not in ("F32", "F16")
