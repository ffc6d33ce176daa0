"""Published peak dense tensor TFLOP/s (bf16, or fp16 where the GPU has no bf16) and the memory CUDA reports."""
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    tflops: float
    memory_gib: float  # total_memory as torch.cuda reports it: a little under the marketed size
    bf16: bool = True

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


GPUS = {g.name: g for g in (
    Gpu("h200", 989.0, 139.8),
    Gpu("h100", 989.0, 79.6),
    Gpu("a100-80", 312.0, 79.2),
    Gpu("a100-40", 312.0, 39.4),
    Gpu("l40s", 362.0, 44.4),
    Gpu("a10g", 125.0, 22.1),
    Gpu("l4", 121.0, 22.0),
    Gpu("rtx4090", 165.2, 23.6),
    Gpu("rtx3090", 71.0, 23.7),
    Gpu("v100", 125.0, 31.7, bf16=False),
    Gpu("t4", 65.0, 14.7, bf16=False),
)}
