"""The safetensors file layout, read and written by hand so tensors can stream (safetensors itself loads or saves
whole dicts of tensors), and files opened through safetensors with a clear error for truncated or corrupt ones instead
of a Rust traceback. A file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
and [start, end) byte range in the data that follows, then the data."""
import json
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import fail

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


def torch_dtype(name: str) -> torch.dtype:
    return next(dtype for dtype, code in DTYPE_NAMES.items() if code == name)


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts in the file, {name: {"dtype", "shape", "data_offsets"}}) without reading any data."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def encode_header(tensors: list[tuple[str, torch.dtype, list[int], int]]) -> bytes:
    """The bytes that start a file holding (name, dtype, shape, nbytes) tensors back to back, in that order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


@contextmanager
def open_safetensors(path: Path, source: str, field: str):
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise fail(source, field, f"{str(path)!r} is truncated or not a safetensors file ({str(exc)[:80]})",
                   "re-download or re-save it") from None
    with handle:
        yield handle
