"""What an export reads besides the adapter: the base it belongs to and the tokenizer files that carry its training
prompt, found the same way by the safetensors merge and every GGUF export."""
from pathlib import Path

from ..errors import fail
from ..run_folder import RunFolder

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")  # what a tokenizer is built from


def resolve_base(base: str | None, run: RunFolder) -> Path:
    """The base an adapter is merged into: --base, else the one its run (or adapter_config.json) names."""
    name = base or run.base_model()
    if not name:
        raise fail("--base", "the adapter does not say which base it belongs to", "pass --base PATH")
    if Path(name).is_dir():
        return Path(name).resolve()
    from huggingface_hub import snapshot_download

    try:  # a hub id: its safetensors from the local cache, downloading only what is missing
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # offline, gated, or not found: all mean "give me a local folder"
        raise fail("--base", f"cannot get base {name!r} ({type(exc).__name__})",
                   "download it first and pass --base DIR") from None


def tokenizer_source(run: RunFolder, base_folder: Path) -> Path:
    """The run's own tokenizer (it carries the training chat template) when it saved one, else the base's."""
    return run.path if (run / "tokenizer_config.json").is_file() else base_folder
