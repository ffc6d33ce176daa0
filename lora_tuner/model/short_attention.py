"""Causal attention for the short spans of packed rows on CPU, as three plain products and a softmax.

torch's fused CPU kernel ("flash attention for CPU") computes its backward in small tiles that are slow for the
spans instruction rows make: for 9 heads of 64 in bf16, forward + backward of a 96-token span took 1.5 ms fused
against 0.47 ms here, 192 tokens 3.0 against 2.0 ms, 320 tokens 7.8 against 5.3 ms; at 512 the fused kernel wins
(14.1 against 16.9 ms). In fp32 (CPUs without native bf16) neither wins clearly at any length (96 tokens: 2.8
against 2.2 ms; 160: 4.8 against 6.1; 320: 14.6 against 19.5), so fp32 keeps the fused kernel. So 16-bit spans up to
MAX_SPAN tokens take this path; it keeps the [heads, span, span]
probabilities in the compute dtype for the backward (1.8 MB for 9 heads at 320 tokens), which the fused kernel does
not. Products run in the inputs' dtype, the softmax and its gradient in fp32 (the scores are rounded to the compute
dtype before the softmax, which the fused kernel does not: bf16 attention outputs within 1.6% of the largest
against its 1.0%, tests/test_packing.py). Written by hand because torch has no unfused SDPA with a custom backward,
and its math fallback (SDPBackend.MATH) is slower than the fused kernel."""
import torch

MAX_SPAN = 320
_causal_masks: dict[tuple[int, torch.device], torch.Tensor] = {}


def takes(query: torch.Tensor) -> bool:
    """Whether a span's [batch, heads, span, dim] queries run here: short, 16-bit, and on the CPU (GPUs have fast
    fused kernels)."""
    return query.device.type == "cpu" and query.element_size() == 2 and query.shape[-2] <= MAX_SPAN


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale: float):
        length = query.shape[-2]
        where = (length, query.device)
        if where not in _causal_masks:
            _causal_masks[where] = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)
        with torch.autocast(query.device.type, enabled=False):  # the products in the inputs' dtype, as documented
            scores = (query @ key.transpose(-1, -2)).float().mul_(scale).masked_fill_(_causal_masks[where],
                                                                                      float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(query.dtype)
            out = probs @ value
        ctx.save_for_backward(query, key, value, probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, probs = ctx.saved_tensors
        grad_value = probs.transpose(-1, -2) @ grad
        grad_probs = (grad @ value.transpose(-1, -2)).float()
        p = probs.float()  # softmax's gradient: p * (dp - sum(dp * p))
        grad_scores = p.mul_(grad_probs.sub_((grad_probs * p).sum(-1, keepdim=True))).mul_(ctx.scale).to(query.dtype)
        return grad_scores @ key, grad_scores.transpose(-1, -2) @ query, grad_value, None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for [batch, heads, span, dim] inputs with as many key as query heads."""
    return _CausalAttention.apply(query, key, value, scale)
