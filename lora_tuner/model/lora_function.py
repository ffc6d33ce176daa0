"""lora-tune's own LoRA linear for training: y = x W^T + b + scale * dropout(x) A^T B^T as one autograd function, put
in place of peft's Linear.forward while the trainer runs (fused_lora_layers). peft stays the model wrapper, the
parameters and the saved format; only the arithmetic changes:
- activations stay in the compute dtype; the two small LoRA matrices are cast to it instead (peft casts every LoRA
  input to the adapter's fp32 and the result back: a quarter of a step on CPU, benchmarks/README.md);
- the scaling and the residual add are one addmm;
- the backward computes no gradient for the frozen weight (nor for an input that needs none) and reuses x A^T from
  the forward; the dropout mask is drawn once, as torch's dropout draws it, and kept as a bool.
Written here because no installed library has a LoRA layer that runs on CPU this way (unsloth's and Liger's kernels
are Triton/CUDA); it is plain PyTorch, so it runs wherever the model does."""
import types
from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, p: float):
        device = x.device.type  # the compute dtype: autocast's when the trainer runs under it, else the input's
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):  # every cast below is explicit
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            a_c, b_c = a.to(dtype), b.to(dtype)
            mask = None
            if p > 0:  # as torch's dropout: a Bernoulli(1 - p) draw per value, kept values scaled by 1 / (1 - p)
                mask = torch.empty_like(flat).bernoulli_(1 - p)
                dropped = flat * mask.div_(1 - p)
                mask = mask.bool()
            else:
                dropped = flat
            xa = dropped @ a_c.t()
            out = torch.nn.functional.linear(flat, weight.to(dtype), None if bias is None else bias.to(dtype))
            out.addmm_(xa, b_c.t(), alpha=scale)
        ctx.save_for_backward(dropped, xa, weight, a_c, b_c, mask)
        ctx.scale, ctx.p, ctx.dtypes = scale, p, (x.dtype, a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        dropped, xa, weight, a_c, b_c, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a_c.dtype)
        gb = g @ b_c  # [tokens, rank]: dL/d(x A^T), over scale
        grad_a = (gb.t() @ dropped).mul_(ctx.scale).to(ctx.dtypes[1])
        grad_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.dtypes[2])
        grad_x = None
        if ctx.needs_input_grad[0]:
            through_lora = (gb @ a_c).mul_(ctx.scale)
            if mask is not None:
                through_lora.mul_(mask).div_(1 - ctx.p)
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
