"""A trained tokenizer as llama.cpp's GGUF vocabulary, so llama.cpp tokenizes text to the ids training used: a
byte-level BPE with its merges (llama.cpp refuses BPE without them) and special tokens marked as control tokens (gguf's
BpeVocab marks them normal); a SentencePiece vocabulary with scores llama.cpp merges by; the BOS, EOS and padding ids,
whether BOS is added, and the chat template the model was trained with."""
import json
from pathlib import Path

from ...errors import fail

# tokenizer.ggml.pre names the regular expressions llama.cpp splits text with before BPE (llama-vocab.cpp); a name it
# does not know makes it refuse the file ("unknown pre-tokenizer type"). llama.cpp's converter finds the name by hashing
# a tokenizer's output on a check text, which knows only published tokenizers; here it is read from tokenizer.json's
# pre_tokenizer, which is what the name stands for, so any tokenizer built on the same splitting is named right (and
# verification then tokenizes sample text in llama.cpp itself). Keys: the pre-tokenizer steps, as pre_tokenizer_steps.
PRE_TOKENIZERS = {
    ("ByteLevel+regex",): "gpt-2",  # GPT-2's regular expression
    ("Digits(individual)", "ByteLevel+regex"): "smollm",  # each digit alone, then GPT-2's (SmolLM, StarCoder)
}


class GgufVocabulary:
    """The vocabulary of the tokenizer files in `folder`, padded to the model's vocabulary size."""

    def __init__(self, folder: Path, vocab_size: int):
        import gguf

        self.gguf, self.folder, self.vocab_size = gguf, folder, vocab_size
        self.has_chat_template = False

    def write(self, writer) -> None:
        """The vocabulary of the tokenizer training used: tokenizer.json when present (transformers loads it first,
        and saves only it, also for SentencePiece models), else tokenizer.model."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        # llama.cpp's SentencePiece tokenizer prepends a space unless told not to; do what the trained one does
        prefix_space = tokenizer.tokenize("a")[0].startswith("\u2581")  # "\u2581a" (or "\u2581", "a"), not "a"
        if (self.folder / "tokenizer.json").is_file():
            spec = json.loads((self.folder / "tokenizer.json").read_text(encoding="utf-8"))
            if spec["model"].get("type") == "BPE" and spec["model"].get("byte_fallback"):
                self._sentencepiece_bpe(writer, spec, prefix_space)  # LLaMA 1/2, Mistral, TinyLlama
            else:
                self._bpe(writer, spec)  # byte-level: LLaMA 3, SmolLM
        elif (self.folder / "tokenizer.model").is_file():
            self._sentencepiece(writer, self.folder / "tokenizer.model", prefix_space)
        else:
            raise fail("tokenizer", "no tokenizer.json or tokenizer.model beside the weights",
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
            raise fail("tokenizer", f"a {model.get('type')} tokenizer without BPE merges",
                       "gguf export covers BPE (tokenizer.json) and SentencePiece (tokenizer.model) tokenizers")
        pre = pre_tokenizer_steps(spec.get("pre_tokenizer"))
        if pre not in PRE_TOKENIZERS:
            raise fail("tokenizer", f"pre-tokenizer {' + '.join(pre) or 'none'} has no name llama.cpp "
                       "knows here, so llama.cpp would refuse the file", "convert the merged export with llama.cpp's "
                       "convert_hf_to_gguf.py, which knows more tokenizers")
        tokens, kinds = self._vocabulary(spec)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZERS[pre])
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])

    def _sentencepiece_bpe(self, writer, spec: dict, prefix_space: bool) -> None:
        """A SentencePiece BPE vocabulary as transformers stores it (BPE merges, byte fallback) written as llama.cpp's
        SentencePiece tokenizer, which merges by token score: a token's score is minus the rank of the first merge
        that makes it, so the highest score is the merge BPE applies first. gguf's LlamaHfVocab gives every token
        -1000, which leaves llama.cpp no merge order. No merges are written: transformers' GGUF reader then rebuilds
        them from the scores, so verification tests the scores llama.cpp uses."""
        tokens, kinds = self._vocabulary(spec)
        rank: dict[str, int] = {}
        for position, merge in enumerate(spec["model"].get("merges") or []):
            rank.setdefault("".join(merge.split(" ", 1) if isinstance(merge, str) else merge), position)
        types, unk = self.gguf.TokenType, spec["model"].get("unk_token")
        kinds = [types.UNKNOWN if token == unk else types.BYTE if kind == types.NORMAL and _is_byte_token(token)
                 else kind for token, kind in zip(tokens, kinds)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(rank[token]) if token in rank else 0.0 for token in tokens])
        writer.add_token_types(kinds)
        writer.add_add_space_prefix(prefix_space)

    def _vocabulary(self, spec: dict) -> tuple[list[str], list]:
        """Tokens by id, padded to the model's vocabulary size, and their types: special added tokens are control
        tokens (gguf's BpeVocab marks them normal), other added tokens user-defined."""
        vocab = dict(spec["model"]["vocab"])
        added = {token["content"]: token for token in spec.get("added_tokens", [])}
        vocab.update({content: token["id"] for content, token in added.items()})
        size = max(self.vocab_size, max(vocab.values()) + 1)
        tokens = [f"[PAD{i}]" for i in range(size)]
        kinds = [self.gguf.TokenType.UNUSED] * size
        for content, token_id in vocab.items():
            tokens[token_id] = content
            special = content in added and added[content].get("special")
            kinds[token_id] = self.gguf.TokenType.CONTROL if special else \
                self.gguf.TokenType.USER_DEFINED if content in added else self.gguf.TokenType.NORMAL
        return tokens, kinds

    def _sentencepiece(self, writer, model_file: Path, prefix_space: bool) -> None:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(model_file))
        size = max(self.vocab_size, sp.vocab_size())
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
        writer.add_add_space_prefix(prefix_space)


def pre_tokenizer_steps(spec: dict | None) -> tuple[str, ...]:
    """tokenizer.json's pre_tokenizer as the steps that decide how text is split, e.g. ('Digits(individual)',
    'ByteLevel+regex'); a ByteLevel that adds a prefix space or splits nothing itself is named so, and never matches."""
    steps = (spec.get("pretokenizers") or []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    names = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            kind += ("+regex" if step.get("use_regex", True) else "") + ("+prefix" if step.get("add_prefix_space") else "")
        elif kind == "Digits":
            kind += "(individual)" if step.get("individual_digits") else "(grouped)"
        names.append(kind)
    return tuple(names)


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")
