"""torch.compile, one decoder layer at a time (regional compilation): every layer has the same code, so it is
compiled once and reused, instead of one long compilation of the whole model. Shapes are dynamic: packed batches
change length every step."""
from transformers import PreTrainedModel


def compile_decoder_layers(model: PreTrainedModel) -> int:
    """Compile in place each module of the classes the architecture names as its repeated blocks; returns how many."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    compiled = 0
    for module in model.modules():
        if type(module).__name__ in blocks:
            module.compile(dynamic=True)
            compiled += 1
    return compiled
