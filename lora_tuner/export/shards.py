"""Read a base model's safetensors one tensor at a time; write merged tensors to size-bounded shards as they come."""
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

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


# safetensors' dtype names
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class Entry:
    shard: Path  # the base file it is read from
    name: str
    shape: list[int]
    dtype: torch.dtype  # as written: the output dtype for floating-point tensors, else unchanged

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_entries(shards: list[Path], out_dtype: torch.dtype, source: str) -> list[Entry]:
    """Every base tensor, in file order, with the shape and dtype it will be written with (headers only)."""
    entries = []
    for shard in shards:
        with open_safetensors(shard, source, "--base") as tensors:
            for name in tensors.keys():
                piece = tensors.get_slice(name)
                dtype = _torch_dtype(piece.get_dtype())
                entries.append(Entry(shard, name, piece.get_shape(), out_dtype if dtype.is_floating_point else dtype))
    return entries


def _torch_dtype(name: str) -> torch.dtype:
    return next(dtype for dtype, code in SAFETENSORS_DTYPES.items() if code == name)


class StreamingShards:
    """Writes safetensors shards tensor by tensor as they are produced, so memory holds one tensor, not a shard.
    Hand-written because safetensors only saves a complete dict of tensors; the format is simple: an 8-byte
    little-endian header length, a JSON header with each tensor's dtype, shape and byte range, then the bytes.
    The layout is fixed up front from the base's headers, which give every shape."""

    def __init__(self, folder: Path, entries: list[Entry], max_bytes: int):
        groups, size = [[]], 0
        for entry in entries:
            if groups[-1] and size + entry.nbytes > max_bytes:
                groups, size = groups + [[]], 0
            groups[-1].append(entry)
            size += entry.nbytes
        count = len(groups)
        self.files = ["model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
                      for i in range(1, count + 1)]
        self.folder, self.groups = folder, groups
        self.file_of = {entry.name: file for file, group in zip(self.files, groups) for entry in group}
        self.total_bytes = sum(entry.nbytes for entry in entries)
        self._handle, self._open_file = None, None

    def write(self, entry: Entry, tensor: torch.Tensor) -> None:
        file = self.file_of[entry.name]
        if file != self._open_file:
            self._start(file)
        assert list(tensor.shape) == list(entry.shape) and tensor.dtype == entry.dtype, entry.name
        self._handle.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def _start(self, file: str) -> None:
        self._close_file()
        group = self.groups[self.files.index(file)]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for entry in group:
            header[entry.name] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
        self._handle = (self.folder / file).open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._open_file = file

    def _close_file(self) -> None:
        if self._handle:
            self._handle.close()
            self._handle = None

    def close(self) -> list[str]:
        self._close_file()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.file_of}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.files
