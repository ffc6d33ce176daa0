"""Attention for packed rows that costs what the examples cost. A padding-free batch is one long row of several
examples with position ids restarting at each; transformers' SDPA path then builds a block-diagonal mask over the
whole row and computes every block of it, masked ones included (a 1,024-token row of eight examples does eight
times the attention work it needs), and a masked SDPA cannot use the fused causal kernel. Here each example's
span runs as its own causal SDPA call (short 16-bit ones on CPU as short_attention's plain products, faster there): the
same numbers, only the blocks that count.

Written by hand because nothing installed does it on CPU: flash-attention's varlen kernel is CUDA-only, and
flex_attention needs a compilation per shape. Registered with transformers' AttentionInterface, so models use it
through attn_implementation like any other kernel; anything that is not a padding-free row (padding masks, a KV
cache, several rows) goes to transformers' own SDPA."""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import short_attention

NAME = "packed_sdpa"
# Each span is padded at its end to a multiple of this (causal attention: the padding is never attended to by the
# real positions). On CPU, bf16 SDPA keeps ~5 MB of kernel state per distinct length it has seen, so unpadded,
# every new example length grew the process (measured: +1.4 GB over 300 lengths).
SPAN_MULTIPLE = 32


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    spans = _example_spans(kwargs.get("position_ids"), query, key)
    if spans is None or dropout or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    outputs = []
    for start, end in spans:
        pad = (0, 0, 0, -(end - start) % SPAN_MULTIPLE)
        q, k, v = (torch.nn.functional.pad(x[:, :, start:end], pad) for x in (query, key, value))
        if short_attention.takes(q):
            out = short_attention.causal_attention(q, k, v, scale)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        outputs.append(out[:, :, :end - start])
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# Every layer of one forward gets the same position ids tensor: its spans are worked out once. The tensor itself is
# kept (an address could be reused by the next batch's), with its version counter against in-place changes.
_last = {"positions": None, "version": None, "spans": None}


def _example_spans(position_ids, query, key) -> list[tuple[int, int]] | None:
    """[start, end) of each example in a single padding-free row whose positions run 0, 1, ... within each example;
    None for anything else."""
    if position_ids is None or position_ids.shape[0] != 1 or query.shape[0] != 1:
        return None
    length = query.shape[2]
    if length < 2 or key.shape[2] != length or position_ids.shape[1] != length:
        return None
    if _last["positions"] is not position_ids or _last["version"] != position_ids._version:
        _last.update(positions=position_ids, version=position_ids._version, spans=_spans(position_ids[0], length))
    return _last["spans"]


def _spans(positions: torch.Tensor, length: int) -> list[tuple[int, int]] | None:
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    # A collator's padding to a multiple ends the row with positions 0, 0, 0, ...: one span, which no label reads.
    padded = 0
    while len(starts) > 1 and starts[-1] == length - 1 - padded and starts[-2] == starts[-1] - 1:
        starts.pop()
        padded += 1
    ends = starts[1:] + [length]
    real_end = starts[-1] if padded else length
    expected = torch.cat([torch.arange(end - start, device=positions.device)
                          for start, end in zip(starts, ends) if start < real_end])
    if not torch.equal(positions[:real_end], expected) or not positions[real_end:].eq(0).all():
        return None
    return list(zip(starts, ends))


def register() -> str:
    """Make attn_implementation=NAME available (idempotent); its masks are SDPA's, used when it falls back."""
    AttentionInterface.register(NAME, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
