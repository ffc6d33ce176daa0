"""Which dtype 'auto' means on this machine: bf16 where the hardware computes it natively (it is ~2x fp32 on CPUs
with AVX512-BF16, and the standard on GPUs since Ampere), fp16 on GPUs without bf16 (T4, V100), fp32 on CPUs
without it (emulated bf16 there is slower than fp32)."""
import torch


def native_dtype() -> tuple[str, str]:
    """(dtype name, why)."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "GPU computes bf16"
        return "float16", f"{torch.cuda.get_device_name()} has no bf16"
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
        return "bfloat16", "CPU has native bf16 (AVX512-BF16/AMX)"
    return "float32", "CPU has no native bf16"


def resolved(name: str) -> str:
    return native_dtype()[0] if name == "auto" else name


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, resolved(name))
