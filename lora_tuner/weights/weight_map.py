"""A model's weights by name, each read from disk when asked for: what a streamed model (verify/streamed.py) runs on and
what every exporter and reader (a safetensors folder with an adapter's delta added, a GGUF dequantized) offers."""
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch


class WeightMap(Mapping):
    """name -> float32 tensor, each computed when read. aliases: names the model asks for that are stored under
    another (a tied output head reads the embedding)."""

    def __init__(self, names: list[str], read: Callable[[str], torch.Tensor], aliases: dict[str, str] | None = None):
        self.names, self.read, self.aliases = set(names), read, aliases or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.aliases.get(name, name)
        if stored not in self.names:
            raise KeyError(name)
        return self.read(stored)

    def __contains__(self, name) -> bool:
        return self.aliases.get(name, name) in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def tied_aliases(config) -> dict[str, str]:
    """The output head's name -> the embedding it shares, for models that tie them (the head is not stored)."""
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(embedding)]}.weight"}


def config_of(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)
