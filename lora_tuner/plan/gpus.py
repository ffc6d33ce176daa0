"""Published peak dense bf16 (fp16 where the GPU has no bf16) tensor TFLOP/s and memory of common GPUs."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    tflops: float
    memory_gb: float


GPUS = {g.name: g for g in (
    Gpu("h200", 989.0, 141),
    Gpu("h100", 989.0, 80),
    Gpu("a100-80", 312.0, 80),
    Gpu("a100-40", 312.0, 40),
    Gpu("l40s", 362.0, 48),
    Gpu("a10g", 125.0, 24),
    Gpu("l4", 121.0, 24),
    Gpu("rtx4090", 165.2, 24),
    Gpu("rtx3090", 71.0, 24),
    Gpu("v100", 125.0, 32),
    Gpu("t4", 65.0, 16),
)}
