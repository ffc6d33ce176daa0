"""What `plan` plans for: GPUs by their published dense peaks (bf16/fp16 tensor cores, and plain fp32) and the
memory CUDA reports, and this machine's CPU. Efficiency is the share of peak a LoRA run's matmuls reach, and
softmax_ns the time per logit of the vocabulary softmax, which is memory-bound and so not a FLOP cost: both are
calibrated against measured runs (benchmarks/README.md, "plan, calibrated"); GPU values are not measured yet."""
import os
from dataclasses import dataclass

GIB = 2**30
GPU_EFFICIENCY = 0.4  # unmeasured: a well-fed LoRA run on a GPU; the CPU value below is measured
# Calibrated on the contest runs (AMD EPYC, AVX512-BF16, 2 cores), see benchmarks/plan_calibration.py.
CPU_EFFICIENCY = 0.28
CPU_SOFTMAX_NS = 3.6
# Measured matmul throughput per core on those CPUs (2048x576 @ 576x1536, ../shared/notes/stack-facts.md).
CPU_TFLOPS_PER_CORE = {"bfloat16": 0.2045, "float16": 0.0925, "float32": 0.0925}


@dataclass(frozen=True)
class Device:
    name: str
    tflops_16bit: float  # bf16 where the device has it, else fp16
    tflops_fp32: float
    memory_gib: float  # torch.cuda total_memory (a little under the marketed size), or host RAM for the CPU
    bf16: bool = True
    efficiency: float = GPU_EFFICIENCY
    softmax_ns: float = 0.0
    calibrated: bool = False

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def tflops(self, dtype: str) -> float:
        return self.tflops_fp32 if dtype == "float32" else self.tflops_16bit


def this_cpu() -> Device:
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Device("cpu", CPU_TFLOPS_PER_CORE["bfloat16"] * cores, CPU_TFLOPS_PER_CORE["float32"] * cores, memory,
                  efficiency=CPU_EFFICIENCY, softmax_ns=CPU_SOFTMAX_NS, calibrated=True)


GPUS = {g.name: g for g in (
    Device("h200", 989.0, 67.0, 139.8),
    Device("h100", 989.0, 67.0, 79.6),
    Device("a100-80", 312.0, 19.5, 79.2),
    Device("a100-40", 312.0, 19.5, 39.4),
    Device("l40s", 362.0, 91.6, 44.4),
    Device("a10g", 125.0, 31.2, 22.1),
    Device("l4", 121.0, 30.3, 22.0),
    Device("rtx4090", 165.2, 82.6, 23.6),
    Device("rtx3090", 71.0, 35.6, 23.7),
    Device("v100", 125.0, 15.7, 31.7, bf16=False),
    Device("t4", 65.0, 8.1, 14.7, bf16=False),
)}
DEVICE_NAMES = ["cpu", *GPUS]


def device(name: str) -> Device:
    return this_cpu() if name == "cpu" else GPUS[name]
