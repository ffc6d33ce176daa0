"""Tokenizers: the base model's, a LLaMA SentencePiece file, or a byte-level one built here (for offline demos)."""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..config.schema import ModelSection
from ..errors import fail

# A chat template for tokenizers that ship none (the byte tokenizer); ChatML-like and easy to read.
# An assistant turn ends with EOS and nothing after it, so its trained tokens are exactly reply + EOS.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% else %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <pad>, <s>, </s>: needs no vocabulary file, so tiny demos run with nothing downloaded.
    Built by hand because transformers and tokenizers ship no ready-made byte vocabulary."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(model: ModelSection) -> PreTrainedTokenizerBase:
    tokenizer = _load(model)
    if tokenizer.pad_token is None:  # batched eval and generation need one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(model: ModelSection) -> PreTrainedTokenizerBase:
    name = model.tokenizer or model.name_or_path
    if name == "bytes":
        return byte_tokenizer()
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        field = "model.tokenizer" if model.tokenizer else "model.name_or_path"
        raise fail(field, f"tokenizer {name!r} not found", "check the path, or use a hub id or 'bytes'")
    if name.endswith(".model"):
        path = Path(name)
        if not path.is_file():
            raise fail("model.tokenizer", f"SentencePiece file {name!r} not found", "check the path")
        return LlamaTokenizer.from_pretrained(str(path.parent), add_bos_token=True)
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        field = "model.tokenizer" if model.tokenizer else "model.name_or_path"
        raise fail(field, f"cannot load a tokenizer from {name!r} ({_first_line(exc)})",
                   "point it at a folder with tokenizer files, a tokenizer.model file, or 'bytes'") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
