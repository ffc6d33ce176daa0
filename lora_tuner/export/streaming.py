"""The merge itself, chunk of rows by chunk of rows on every core: base rows mapped from disk, the adapter's delta
added in fp32, the sum cast to the output dtype and written at its place in the output shards."""
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config.schema import QuantizationSection, Recipe
from .base_reader import Entry, mapped_rows
from .lora_deltas import LoraDeltas
from .shard_writer import StreamingShards

CHUNK_BYTES = 2 * 2**20  # the unit of merging and writing: large enough that a write has no overhead
BLOCK_ELEMENTS = 2**19  # fp32 arithmetic block of 2 MB per worker: it stays in the core's cache
QUEUED_PER_WORKER = 2
_worker = threading.local()  # each worker's reused buffers


class Float16Overflow(Exception):
    """A merged value beyond float16's range (65,504): the export cannot be float16."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def stream_merge(deltas: LoraDeltas, entries: list[Entry], work: Path, out_dtype: torch.dtype, max_bytes: int,
                 quantization: QuantizationSection | None, base_folder: Path, recipe: Recipe | None) -> list[str]:
    """Write every base tensor, merged, into shards in `work`; return their file names. With `quantization`, weights
    that 4-bit loading quantizes are first round-tripped, as training saw them.
    Chunks of rows go to one worker thread per core, which reads them (mapped), adds the delta, casts them and
    writes them at their place in the output: each worker alternates arithmetic and writing, so the cores stay busy."""
    if quantization:
        from .as_trained import quantized_weight_names
    round_tripped = quantized_weight_names(str(base_folder)) if quantization else set()
    load_dtype = getattr(torch, recipe.model.dtype) if recipe else out_dtype
    workers = torch.get_num_threads()
    with StreamingShards(work, entries, max_bytes) as shards, _one_thread_per_op(), ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for entry in tqdm(entries, desc="merging", unit="tensor"):
            if entry.name in round_tripped:
                rows_of = _round_tripped_rows(entry, quantization, load_dtype)
            else:
                rows_of = partial(mapped_rows, entry)
            step = _rows_per_chunk(entry)
            for start in range(0, entry.rows, step):
                stop = min(start + step, entry.rows)
                pending.append(pool.submit(_merge_chunk, entry, rows_of, start, stop, deltas, shards))
                if len(pending) > QUEUED_PER_WORKER * workers:  # bounds memory: few chunks exist at once
                    pending.popleft().result()
        for chunk in pending:
            chunk.result()
        return shards.close()


def _round_tripped_rows(entry: Entry, quantization: QuantizationSection, load_dtype: torch.dtype):
    """Rows of the weight as 4-bit training saw it. Quantization blocks span rows, so the whole weight is done."""
    from .as_trained import round_trip_4bit

    weight = round_trip_4bit(mapped_rows(entry, 0, entry.rows), quantization, load_dtype)
    return lambda start, stop: weight[start:stop]


def _rows_per_chunk(entry: Entry) -> int:
    return max(1, CHUNK_BYTES // max(1, entry.row_elements * entry.dtype.itemsize))


def _merge_chunk(entry: Entry, rows_of, start: int, stop: int, deltas: LoraDeltas, shards: StreamingShards) -> None:
    rows = rows_of(start, stop)
    raw = _reused("out", rows.numel() * entry.dtype.itemsize, torch.uint8)
    scratch = _reused("scratch", max(BLOCK_ELEMENTS, entry.row_elements), torch.float32)
    out = raw.view(entry.dtype).view(rows.shape)
    deltas.merge_rows(entry.name, rows, start, out, scratch)
    if entry.dtype == torch.float16 and torch.isinf(out).any():
        raise Float16Overflow(entry.name)
    shards.write(entry, start * entry.row_elements * entry.dtype.itemsize, raw.numpy().data)


def _reused(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This worker's buffer `name`, grown when needed: fresh memory per chunk would cost a page fault per 4 KB."""
    buffer = getattr(_worker, name, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_worker, name, buffer)
    return buffer[:numel]


@contextmanager
def _one_thread_per_op():
    """Parallel over chunks, not inside ops: with OpenMP threads inside each op as well, the threads take turns on
    the cores and the merge is ~15% slower on 2 cores (benchmarks/README.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
