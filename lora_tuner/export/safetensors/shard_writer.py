"""The merged model's safetensors shards, laid out before any tensor is merged so chunks can be written in any
order, from any thread."""
import json
import os
import struct
from pathlib import Path

import torch

from ...weights.shards import DTYPE_NAMES, INDEX, Entry


def encode_header(tensors: list[tuple[str, torch.dtype, list[int], int]]) -> bytes:
    """The bytes that start a file holding (name, dtype, shape, nbytes) tensors back to back, in that order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


class StreamingShards:
    """Shards of at most max_bytes, filled in base order. The base's headers give every shape, so every byte's place
    is known up front: headers are written first, then `write` puts a chunk of a tensor at its offset."""

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
        self.folder = folder
        self.file_of = {entry.name: file for file, group in zip(self.files, groups) for entry in group}
        self.total_bytes = sum(entry.nbytes for entry in entries)
        self._fds, self._place = [], {}
        try:
            for file, group in zip(self.files, groups):
                self._start(file, group)
        except BaseException:
            self._close_files()
            raise

    def _start(self, file: str, group: list[Entry]) -> None:
        """Create the shard with its header, and note where each of its tensors goes."""
        header = encode_header([(e.name, e.dtype, e.shape, e.nbytes) for e in group])
        fd = os.open(self.folder / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        _write_at(fd, memoryview(header), 0)
        offset = len(header)
        for entry in group:
            self._place[entry.name] = (fd, offset)
            offset += entry.nbytes

    def write(self, entry: Entry, start: int, data: memoryview) -> None:
        """Put data at byte `start` of entry's tensor. Safe from several threads: each chunk has its own place."""
        fd, offset = self._place[entry.name]
        _write_at(fd, data, offset + start)

    def close(self) -> list[str]:
        """Close the shards and write the index; the file names, in order."""
        self._close_files()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.file_of}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.files

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._close_files()

    def _close_files(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
