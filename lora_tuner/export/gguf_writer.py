"""The GGUF exporter: a merged LLaMA-family model as one .gguf file for llama.cpp, Ollama and GPT4All, written with
the `gguf` package (llama.cpp's own Python library) one tensor at a time, so no llama.cpp build is needed.

What llama.cpp expects and its converter does, done here too: Q and K projection rows permuted into the rotary
layout llama.cpp computes with; a tied output head not written (llama.cpp reuses token_embd); 1-D tensors (norms)
kept in F32; with q4_0, the embedding and output head in q8_0 (they are the most sensitive); the BPE vocabulary
with its merges (llama.cpp refuses BPE without them) and special tokens marked as control tokens (gguf's BpeVocab
marks them normal); the chat template and stop token the model was trained with."""
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import fail
from .weights import MergedWeights

TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # LLaMA 1/2/3, Mistral, SmolLM: llama.cpp's "llama"
SENSITIVE = ("token_embd.weight", "output.weight")  # kept at q8_0 in a q4_0 file
# tokenizer.json pre-tokenizer -> llama.cpp's name for it (tokenizer.ggml.pre); others are refused
PRE_TOKENIZERS = {"ByteLevel": "gpt2"}


class GgufExporter:
    def __init__(self, model_folder: Path, kind: str, source: str):
        """model_folder: the merged model (config.json and tokenizer files); kind: one of TYPES."""
        import gguf

        self.gguf, self.folder, self.kind, self.source = gguf, model_folder, kind, source
        self.has_chat_template = False
        self.config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
        architecture = (self.config.get("architectures") or ["?"])[0]
        if architecture not in ARCHITECTURES:
            raise fail(source, "--format", f"gguf export of {architecture} is not supported",
                       "gguf export covers LLaMA-family models (LLaMA 1/2/3, Mistral, SmolLM); for others run "
                       "llama.cpp's convert_hf_to_gguf.py on a `lora-tune merge` export")
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", "linear"):
            raise fail(source, "--format", f"rope type {rope['rope_type']!r} is not supported by the gguf export",
                       "convert the `lora-tune merge` export with llama.cpp's convert_hf_to_gguf.py")

    def write(self, weights: MergedWeights, path: Path) -> list[str]:
        from tqdm.auto import tqdm

        writer = self.gguf.GGUFWriter(path, "llama")
        self._metadata(writer)
        self._tokenizer(writer)
        planned = []
        for entry in weights.entries:
            name = self._name(entry.name)
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
        writer.add_name(self.folder.name)
        writer.add_context_length(c["max_position_embeddings"])
        writer.add_embedding_length(c["hidden_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(c.get("num_key_value_heads") or heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(self.gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(c["vocab_size"])
        writer.add_file_type(getattr(self.gguf.LlamaFileType, FILE_TYPES[self.kind]))
        writer.add_quantization_version(self.gguf.GGML_QUANT_VERSION)

    def _tokenizer(self, writer) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if (self.folder / "tokenizer.model").is_file():
            self._sentencepiece(writer, self.folder / "tokenizer.model")
        elif (self.folder / "tokenizer.json").is_file():
            self._bpe(writer, json.loads((self.folder / "tokenizer.json").read_text(encoding="utf-8")))
        else:
            raise fail(self.source, "tokenizer", "no tokenizer.json or tokenizer.model beside the weights",
                       "export a folder written by lora-tune merge (it copies the run's tokenizer)")
        for role in ("bos", "eos", "unk", "pad"):
            token_id = getattr(tokenizer, f"{role}_token_id")
            if token_id is not None:
                getattr(writer, f"add_{role}_token_id")(token_id)
        ids = tokenizer("a")["input_ids"]
        writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
        self.has_chat_template = bool(tokenizer.chat_template)
        if self.has_chat_template:
            writer.add_chat_template(tokenizer.chat_template)

    def _bpe(self, writer, spec: dict) -> None:
        model = spec["model"]
        if model.get("type") != "BPE" or not model.get("merges"):
            raise fail(self.source, "tokenizer", f"a {model.get('type')} tokenizer without BPE merges",
                       "gguf export covers BPE (tokenizer.json) and SentencePiece (tokenizer.model) tokenizers")
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        if pre not in PRE_TOKENIZERS:
            raise fail(self.source, "tokenizer", f"pre-tokenizer {pre!r} has no llama.cpp name here",
                       "convert the merged export with llama.cpp's convert_hf_to_gguf.py, which knows more")
        vocab = dict(model["vocab"])
        added = {token["content"]: token for token in spec.get("added_tokens", [])}
        vocab.update({content: token["id"] for content, token in added.items()})
        size = max(self.config["vocab_size"], max(vocab.values()) + 1)
        tokens = [f"[PAD{i}]" for i in range(size)]
        kinds = [self.gguf.TokenType.UNUSED] * size
        for content, token_id in vocab.items():
            tokens[token_id] = content
            special = content in added and added[content].get("special")
            kinds[token_id] = self.gguf.TokenType.CONTROL if special else \
                self.gguf.TokenType.USER_DEFINED if content in added else self.gguf.TokenType.NORMAL
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZERS[pre])
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])

    def _sentencepiece(self, writer, model_file: Path) -> None:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(model_file))
        size = max(self.config["vocab_size"], sp.vocab_size())
        tokens, scores, kinds = [], [], []
        for i in range(size):
            if i >= sp.vocab_size():
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                kinds.append(self.gguf.TokenType.UNUSED)
                continue
            tokens.append(sp.id_to_piece(i).encode())
            scores.append(sp.get_score(i))
            kinds.append(self.gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                         self.gguf.TokenType.CONTROL if sp.is_control(i) else
                         self.gguf.TokenType.BYTE if sp.is_byte(i) else
                         self.gguf.TokenType.UNUSED if sp.is_unused(i) else self.gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(kinds)
        writer.add_add_space_prefix(True)

    # tensors
    def _name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for what llama.cpp does not read (a tied head, rotary caches)."""
        if hf_name == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            return None
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        names = self.gguf.tensor_mapping.get_tensor_name_map(self.gguf.MODEL_ARCH.LLAMA, self.config["num_hidden_layers"])
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise fail(self.source, "--format", f"{hf_name!r} has no place in a llama GGUF",
                       "export a plain LLaMA-family model (no extra modules)")
        return name

    def _type(self, name: str, shape: list[int]):
        """F32 for 1-D tensors, else the requested type (q8_0 for the sensitive ones in q4_0); a row that is not a
        whole number of quantization blocks stays F16, as llama.cpp does."""
        types = self.gguf.GGMLQuantizationType
        if len(shape) < 2:
            return types.F32
        wanted = types.Q8_0 if self.kind == "q4_0" and name in SENSITIVE else getattr(types, TYPES[self.kind])
        block = self.gguf.GGML_QUANT_SIZES[wanted][0]
        return wanted if shape[-1] % block == 0 else types.F16

    def _encode(self, tensor: torch.Tensor, name: str, kind) -> np.ndarray:
        heads, kv_heads = self.config["num_attention_heads"], self.config.get("num_key_value_heads")
        if name.endswith("attn_q.weight"):
            tensor = rotary_permute(tensor, heads)
        elif name.endswith("attn_k.weight"):
            tensor = rotary_permute(tensor, kv_heads or heads)
        array = tensor.float().numpy()
        if kind.name == "F32":
            return array
        if kind.name == "F16":
            return array.astype(np.float16)
        return self.gguf.quants.quantize(array, kind)


def rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face stores each head's rotary pairs as two halves (rotate_half); llama.cpp's rope wants them
    interleaved: within each head, rows (i, i + d/2) become rows (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _quantized(kind) -> bool:
    return kind.name not in ("F32", "F16")
