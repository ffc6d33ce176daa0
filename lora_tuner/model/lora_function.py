"""lora-tune's own LoRA linear for training: y = x W^T + b + scale * dropout(x) A^T B^T as one autograd function, put
in place of peft's Linear.forward while the trainer runs (fused_lora_layers). peft stays the model wrapper, the
parameters and the saved format; only the arithmetic changes:
- activations stay in the compute dtype; the two small LoRA matrices are cast to it instead (peft casts every LoRA
  input to the adapter's fp32 and the result back: a quarter of a step on CPU, benchmarks/README.md);
- the scaling and the residual add are one addmm;
- the backward computes no gradient for the frozen weight (nor for an input that needs none) and reuses x A^T from
  the forward;
- dropout masks come from 16 random bits per value (dropout_keep), a quarter of what torch's dropout draws, and are
  kept as a bool.
Written here because no installed library has a LoRA layer that runs on CPU this way (unsloth's and Liger's kernels
are Triton/CUDA); it is plain PyTorch, so it runs wherever the model does."""
import math
import types
from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


# torch's dropout draws one full random number per value with bernoulli_: on CPU that was a quarter of a SmolLM2
# training step at dropout 0.05 (benchmarks/README.md). One 64-bit draw gives four 16-bit values instead, so p
# becomes a multiple of 1/65536 (0.05 -> 0.0500031), a difference no training run can see.
_LEVELS = 1 << 16


def dropout_keep(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask of `shape`, each value False with probability p' = round(p * 65536) / 65536; and that p'."""
    cut = round(p * _LEVELS)
    count = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    return bits.view(torch.int16)[:count].view(shape) >= cut - _LEVELS // 2, cut / _LEVELS


def _zero_where_dropped(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """values with the dropped ones zeroed: their bits and-ed with an all-ones or all-zeros word, three times faster
    on CPU than torch.where or masked_fill (measured on 16-bit values: 0.1 ms against 0.34 ms per 590k)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    return (values.view(bits) & keep.to(bits).neg_()).view(values.dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, p: float):
        device = x.device.type  # the compute dtype: autocast's when the trainer runs under it, else the input's
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):  # every cast below is explicit
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            a_c, b_c = a.to(dtype), b.to(dtype)
            keep, dropped = None, flat
            if p > 0:  # as torch's dropout: dropped values are zeros, kept ones scaled by 1 / (1 - p)
                keep, p = dropout_keep(flat.shape, p, flat.device)
                dropped = _zero_where_dropped(flat, keep).mul_(1 / (1 - p))
            xa = dropped @ a_c.t()
            out = torch.nn.functional.linear(flat, weight.to(dtype), None if bias is None else bias.to(dtype))
            out.addmm_(xa, b_c.t(), alpha=scale)
        ctx.save_for_backward(dropped, xa, weight, a_c, b_c, keep)
        ctx.scale, ctx.p, ctx.dtypes = scale, p, (x.dtype, a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        dropped, xa, weight, a_c, b_c, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a_c.dtype)
        gb = (g @ b_c).mul_(ctx.scale)  # [tokens, rank]: dL/d(x A^T)
        grad_a = (gb.t() @ dropped).to(ctx.dtypes[1])
        grad_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.dtypes[2])
        grad_x = None
        if ctx.needs_input_grad[0]:
            through_lora = gb @ a_c
            if keep is not None:
                through_lora = _zero_where_dropped(through_lora, keep).mul_(1 / (1 - ctx.p))
            grad_x = torch.addmm(through_lora, g, weight.to(g.dtype)).view(*grad.shape[:-1], -1).to(ctx.dtypes[0])
        return grad_x, None, None, grad_a, grad_b, None, None


def lora_linear(x, weight, bias, a, b, scale: float, p: float = 0.0) -> torch.Tensor:
    """x W^T + b + scale * dropout_p(x) A^T B^T, with A [rank, in] and B [out, rank] as peft stores them."""
    return _LoraLinear.apply(x, weight, bias, a, b, scale, p)


def _forward(self: PeftLoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's Linear.forward for one plain LoRA adapter on an nn.Linear; anything else goes to peft's own."""
    names = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1 or names[0] not in self.lora_A
            or names[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    base = self.base_layer
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], p)


def fusable(module: torch.nn.Module) -> bool:
    """A peft LoRA layer over a plain (16-bit or 32-bit) nn.Linear: bitsandbytes' 4/8-bit layers keep peft's path."""
    return isinstance(module, PeftLoraLinear) and type(module.base_layer) is torch.nn.Linear and \
        not module.fan_in_fan_out


@contextmanager
def fused_lora_layers(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every fusable LoRA layer of `model` runs lora_linear; yields how many there are."""
    layers = [module for module in model.modules() if fusable(module)]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the class's (peft's) forward again
