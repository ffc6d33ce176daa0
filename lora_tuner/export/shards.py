"""Read a base model's safetensors one tensor at a time; write merged tensors in size-bounded shards."""
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import fail
from ..safe_files import open_safetensors

INDEX = "model.safetensors.index.json"


def base_shards(folder: Path, source: str) -> list[Path]:
    """The base's safetensors files in index order (or the single model.safetensors)."""
    index = folder / INDEX
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise fail(source, "--base", f"{str(folder)!r} holds no model.safetensors or {INDEX}",
               "point --base at a folder saved with save_pretrained (safetensors)")


def tensor_bytes(shards: list[Path], dtype: torch.dtype, source: str) -> int:
    """Size of all base tensors once cast to dtype (reads headers only)."""
    total = 0
    for shard in shards:
        with open_safetensors(shard, source, "--base") as tensors:
            for key in tensors.keys():
                total += math.prod(tensors.get_slice(key).get_shape()) * dtype.itemsize
    return total


class ShardWriter:
    """Collects tensors until the shard is full, then writes it; names get their final '-of-N' at close."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.written) + 1:05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        count = len(self.written)
        weight_map, files = {}, []
        for number, (path, names) in enumerate(self.written, start=1):
            final = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            os.rename(path, self.folder / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files
