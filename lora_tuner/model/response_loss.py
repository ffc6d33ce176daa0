"""The loss where it is trained, and nowhere else: the LM head runs on response positions only, a few hundred rows
of logits at a time, so a [tokens x vocab] logits tensor never exists whole. Token accuracy comes from the same pass.

Written by hand because no installed library does this on CPU: TRL 1.16's fused LM head scores every position
unless Triton is present, in 4096 x 32768 tiles, recomputes them in backward and adds entropy; Liger's fused linear
cross-entropy is Triton-only. transformers does select positions (`logits_to_keep` with a boolean mask), but then
builds their logits whole; it is used here to skip the head entirely while the backbone runs."""
from contextlib import contextmanager

import torch

CHUNK_ELEMENTS = 2**21  # logits per chunk: 8 MB in fp32, which stays in cache on CPUs and is nothing on a GPU


class ChunkedCrossEntropy(torch.autograd.Function):
    """(summed cross-entropy, count of top-1 hits) of hidden @ weight.T (+ bias) against targets. The gradient with
    respect to `hidden` is computed in forward, chunk by chunk, and only scaled in backward: the logits are never
    kept. The head itself is frozen here (no weight gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype):
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        weight_c = weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        wants_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if wants_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(compute_dtype)
            t = targets[start:start + rows]
            logits = torch.nn.functional.linear(h, weight_c, bias_c).float()  # rounded as the model's own head is
            top, best = logits.max(dim=-1)
            correct += (best == t).sum()
            logits.sub_(top.unsqueeze(-1))
            target = logits.gather(1, t.unsqueeze(-1)).squeeze(-1)
            probs = logits.exp_()  # in place: the chunk's logits are not needed any more
            total = probs.sum(dim=-1)
            loss += (total.log() - target).sum()
            if wants_grad:  # d loss / d logits = softmax - one_hot(target)
                probs.div_(total.unsqueeze(-1))
                probs[torch.arange(len(t), device=t.device), t] -= 1
                grad[start:start + rows] = (probs.to(compute_dtype) @ weight_c).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype) if grad is not None else None), None, None, None, None


@contextmanager
def captured_output(module: torch.nn.Module):
    """The module's output on its next call (the backbone's last hidden state), read through a forward hook so the
    model is still called as a whole, through DDP and PEFT."""
    box = {}

    def keep(_, __, output):
        box["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = module.register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()
