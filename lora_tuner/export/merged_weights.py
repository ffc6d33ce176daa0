"""What every exporter writes: a model's tensors with an adapter folded in, read a few rows at a time from mapped
files, never whole. The safetensors writer (safetensors/streaming.py) and the GGUF writer (gguf/writer.py) both
consume it."""
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..config.schema import QuantizationSection
from ..weights.weight_map import WeightMap, config_of, tied_aliases
from ..weights.shards import Entry, base_shards, mapped_rows, plan_entries
from .lora_deltas import LoraDeltas


@dataclass
class MergedWeights:
    entries: list[Entry]  # every tensor, in file order, with the dtype a safetensors writer writes it in
    deltas: LoraDeltas | None  # None: a model already merged, written as it is
    quantization: QuantizationSection | None = None  # weights 4-bit training saw round-tripped through it
    load_dtype: torch.dtype | None = None  # the dtype training loaded the base in, before quantizing
    round_tripped: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, folder: Path, out_dtype: torch.dtype, deltas: LoraDeltas | None = None,
           quantization: QuantizationSection | None = None, load_dtype: torch.dtype | None = None) -> "MergedWeights":
        entries = plan_entries(base_shards(folder), out_dtype)
        names = set()
        if quantization:
            from .as_trained import quantized_weight_names

            names = quantized_weight_names(str(folder))
        return cls(entries, deltas, quantization, load_dtype or out_dtype, names)

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    def rows_of(self, entry: Entry) -> Callable[[int, int], torch.Tensor]:
        """start, stop -> the base's rows of this tensor, as training saw them."""
        if entry.name not in self.round_tripped:
            return partial(mapped_rows, entry)
        from .as_trained import round_trip_4bit  # quantization blocks span rows, so the whole weight is done

        weight = round_trip_4bit(mapped_rows(entry, 0, entry.rows), self.quantization, self.load_dtype)
        return lambda start, stop: weight[start:stop]

    def merge_rows(self, entry: Entry, rows: torch.Tensor, first_row: int, out: torch.Tensor,
                   scratch: torch.Tensor) -> None:
        """out = rows + the adapter's delta for them, in out's dtype (see LoraDeltas.merge_rows)."""
        if self.deltas is None:
            out.copy_(rows)
        else:
            self.deltas.merge_rows(entry.name, rows, first_row, out, scratch)

    def check_rows(self, entry: Entry, rows: torch.Tensor, first_row: int, out: torch.Tensor) -> bool:
        """merge_rows' output against the formula computed another way (LoraDeltas.check_rows)."""
        if self.deltas is None:
            return torch.equal(out, rows.to(out.dtype))
        return self.deltas.check_rows(entry.name, rows, first_row, out)

    def tensor(self, entry: Entry) -> torch.Tensor:
        """The whole merged tensor in float32 (floating-point tensors), for writers that need it at once."""
        rows = self.rows_of(entry)(0, entry.rows)
        if not entry.source_dtype.is_floating_point:
            return rows.clone()
        out = torch.empty(rows.shape, dtype=torch.float32)
        self.merge_rows(entry, rows, 0, out, torch.empty(max(2**19, entry.row_elements), dtype=torch.float32))
        return out.view(entry.shape)

    def weight_map(self, aliases: dict[str, str] | None = None) -> WeightMap:
        """Every tensor by name, merged in float32 when read: what a streamed model (verify/streamed.py) runs on."""
        by_name = {entry.name: entry for entry in self.entries}
        return WeightMap(list(by_name), lambda name: self.tensor(by_name[name]), aliases)


def streamed_source(folder: Path, name: str, config=None, deltas: LoraDeltas | None = None,
                    quantization: QuantizationSection | None = None, load_dtype: torch.dtype | None = None):
    """A model folder's weights, with an adapter's delta added when given, as a streamed model to score (float32):
    a verify.verdict.Source."""
    from ..verify.verdict import Source  # transformers comes with it: a --no-verify merge does without

    config = config or config_of(folder)
    weights = MergedWeights.of(folder, torch.float32, deltas, quantization, load_dtype)
    return Source(config, weights.weight_map(tied_aliases(config)), name)
