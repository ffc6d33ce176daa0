"""The safetensors exporter: merged weights written chunk of rows by chunk of rows on every core (base rows mapped
from disk, the adapter's delta added in fp32, the sum cast to the output dtype) at their place in the output shards."""
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...weights.shards import Entry
from .shard_writer import StreamingShards
from ..merged_weights import MergedWeights

CHUNK_BYTES = 2 * 2**20  # the unit of merging and writing: large enough that a write has no overhead
BLOCK_ELEMENTS = 2**19  # fp32 arithmetic block of 2 MB per worker: it stays in the core's cache
QUEUED_PER_WORKER = 2
_worker = threading.local()  # each worker's reused buffers


class Float16Overflow(Exception):
    """A merged value beyond float16's range (65,504): the export cannot be float16."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class MergeCheckFailed(RuntimeError):
    """A merged chunk is not W + scale * B @ A within its dtype's rounding: a bug in the merge, never the user's."""


class SafetensorsExporter:
    """Sharded safetensors + index, as save_pretrained writes them; shards of at most max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def write(self, weights: MergedWeights, work: Path) -> list[str]:
        """Every tensor into shards in `work`; their file names. Chunks of rows go to one worker thread per core,
        which reads them (mapped), adds the delta, casts them and writes them at their place in the output: each
        worker alternates arithmetic and writing, so the cores stay busy."""
        workers = torch.get_num_threads()
        with StreamingShards(work, weights.entries, self.max_bytes) as shards, _one_thread_per_op(), \
                ThreadPoolExecutor(workers) as pool:
            pending = deque()
            for entry in tqdm(weights.entries, desc="merging", unit="tensor"):
                rows_of = weights.rows_of(entry)
                step = _rows_per_chunk(entry)
                for start in range(0, entry.rows, step):
                    stop = min(start + step, entry.rows)
                    pending.append(pool.submit(_merge_chunk, weights, entry, rows_of, start, stop, shards))
                    if len(pending) > QUEUED_PER_WORKER * workers:  # bounds memory: few chunks exist at once
                        pending.popleft().result()
            for chunk in pending:
                chunk.result()
            return shards.close()


def _rows_per_chunk(entry: Entry) -> int:
    return max(1, CHUNK_BYTES // max(1, entry.row_elements * entry.dtype.itemsize))


def _merge_chunk(weights: MergedWeights, entry: Entry, rows_of, start: int, stop: int,
                 shards: StreamingShards) -> None:
    rows = rows_of(start, stop)
    raw = _reused("out", rows.numel() * entry.dtype.itemsize, torch.uint8)
    scratch = _reused("scratch", max(BLOCK_ELEMENTS, entry.row_elements), torch.float32)
    out = raw.view(entry.dtype).view(rows.shape)
    weights.merge_rows(entry, rows, start, out, scratch)
    if entry.dtype == torch.float16 and _overflowed(out):
        raise Float16Overflow(entry.name)
    if not weights.check_rows(entry, rows, start, out):  # every chunk, before a byte of it is written
        raise MergeCheckFailed(f"rows {start}-{stop} of {entry.name!r} differ from the base + scale * B @ A by more "
                               f"than {entry.dtype} rounding; nothing was put in place: please report this")
    shards.write(entry, start * entry.row_elements * entry.dtype.itemsize, raw.numpy().data)


def _overflowed(out: torch.Tensor) -> bool:
    """A value rounded to infinity. aminmax, not isinf: isinf on float16 is not vectorised on CPUs and took 14x as
    long, a sixth of a 7B merge's time."""
    low, high = torch.aminmax(out)
    return bool(torch.isinf(low) or torch.isinf(high))


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
