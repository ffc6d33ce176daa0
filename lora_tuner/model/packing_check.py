"""Packing is only safe when attention honours the restart of position ids between packed examples. Whether it
does depends on the architecture, the attention kernel and the transformers version, so rather than trust a
list we measure it on the loaded model: two sequences run packed in one row must give the logits they give alone."""
import torch
from transformers import PreTrainedModel

TOLERANCE = 0.05  # relative to max |logit|; bf16 noise is ~1e-2, leaking attention changes logits by ~30%


def packing_leak(model: PreTrainedModel, vocab_size: int) -> float:
    """Max |logit difference| (relative to the largest logit) between packed and separate sequences."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, vocab_size, (1, n), generator=generator).to(device) for n in (12, 9))
    positions = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1).float()
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False)
    model.train(was_training)
    return ((alone - packed.logits.float()).abs().max() / alone.abs().max().clamp(min=1e-6)).item()


def packing_is_isolated(model: PreTrainedModel, vocab_size: int) -> bool:
    return packing_leak(model, vocab_size) <= TOLERANCE
