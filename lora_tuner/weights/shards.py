"""Read a base model's safetensors a few rows at a time, mapped rather than copied into memory."""
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import fail
from .safetensors import open_safetensors, read_header

INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


def torch_dtype(name: str) -> torch.dtype:
    return next(dtype for dtype, code in DTYPE_NAMES.items() if code == name)


def base_shards(folder: Path, field: str = "--base") -> list[Path]:
    """The base's safetensors files in index order (or the single model.safetensors)."""
    index = folder / INDEX
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise fail(field, f"{str(folder)!r} holds no model.safetensors or {INDEX} (pickled weights are never read)",
               "point --base at a folder saved with save_pretrained (safetensors)")


@dataclass
class Entry:
    shard: Path  # the base file it is read from
    offset: int  # where its bytes start in that file
    name: str
    shape: list[int]
    source_dtype: torch.dtype  # as stored in the base
    dtype: torch.dtype  # as written: the output dtype for floating-point tensors, else unchanged

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    # Tensors are merged and written in slices of rows along their first dimension; a 0-d tensor is one row.
    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:])


def plan_entries(shards: list[Path], out_dtype: torch.dtype) -> list[Entry]:
    """Every base tensor, in file order, with the shape and dtype it will be written with (headers only)."""
    entries = []
    for shard in shards:
        with open_safetensors(shard, "--base"):
            pass  # safetensors checks the header against the file size: a truncated file is named here
        data_start, header = read_header(shard)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in DTYPE_NAMES.values():
                raise fail("--base", f"{name!r} in {str(shard)!r} is {info['dtype']}, which merge does not read",
                           f"convert the base to one of {', '.join(DTYPE_NAMES.values())} first")
            dtype = torch_dtype(info["dtype"])
            entries.append(Entry(shard, data_start + info["data_offsets"][0], name, info["shape"], dtype,
                                 out_dtype if dtype.is_floating_point else dtype))
    return entries


def mapped_rows(entry: Entry, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the base tensor (2-D), as a view of their bytes in the base file: pages are read as they
    are touched and unmapped with the view, so memory never holds a shard and nothing is copied into fresh memory."""
    count = (stop - start) * entry.row_elements
    if count == 0:
        return torch.empty(stop - start, entry.row_elements, dtype=entry.source_dtype)
    first = entry.offset + start * entry.row_elements * entry.source_dtype.itemsize
    aligned = first - first % mmap.ALLOCATIONGRANULARITY
    with open(entry.shard, "rb") as file:
        # copy-on-write: writable as torch.frombuffer wants, and never written
        mapping = mmap.mmap(file.fileno(), first + count * entry.source_dtype.itemsize - aligned, offset=aligned,
                            access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=entry.source_dtype, count=count, offset=first - aligned).view(
        stop - start, entry.row_elements)
