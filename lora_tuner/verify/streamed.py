"""A model computed one module at a time from weights read on demand, so verifying a 7B export needs a few of its
tensors in memory, never the model.

accelerate's offload hooks do the streaming: the model is built from its config on the meta device (buffers such
as rotary tables stay real), and before each module runs its weights are taken from a mapping and freed again after
it. The mapping is lazy: each name read computes that one tensor in float32 from wherever it lives (a safetensors
shard with an adapter's delta added, a GGUF tensor dequantized). Any architecture transformers builds works, since
the model's own forward runs unchanged."""
import ctypes
from collections.abc import Mapping

import torch

from ..errors import fail


def packs_apart(config) -> bool:
    """Whether this architecture keeps examples packed into one row apart (position ids restarting), so rows can be
    scored packed: measured (model/packing_check.py) on a one-layer copy with a small vocabulary and feed-forward
    width, since support differs by architecture and transformers version (~0.3 GB for a 7B's layer, briefly)."""
    import copy

    from transformers import AutoModelForCausalLM

    from ..model.packing_check import packing_is_isolated

    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size = 1, min(config.vocab_size, 512)
    for width in ("intermediate_size", "n_inner"):  # attention is what is measured; the MLP only costs memory
        if getattr(small, width, None):
            setattr(small, width, 64)
    torch.manual_seed(0)
    return packing_is_isolated(AutoModelForCausalLM.from_config(small, dtype=torch.float32), small.vocab_size)


def _map_large_allocations() -> None:
    """glibc carves allocations below its adaptive mmap threshold from the heap and keeps them when freed. A streamed
    model allocates and frees a float32 copy of every weight once per pass, and a 7B export's verification held
    4.8 GB of freed heap that way. A fixed threshold of 1 MB (M_MMAP_THRESHOLD, -3) maps each large block and gives
    it back when freed, at the cost of fresh pages per tensor. Elsewhere than glibc this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


def streamed_model(config, weights: Mapping, source: str = "model") -> torch.nn.Module:
    """The model of `config` in float32 on the CPU, each module's weights read from `weights` as it runs."""
    from accelerate import cpu_offload, init_empty_weights
    from transformers import AutoModelForCausalLM

    _map_large_allocations()
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary tables and masks computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = sorted(name for name, _ in model.named_parameters() if name not in weights)
    if missing:
        raise fail("weights", f"{len(missing)} of the model's weights are missing (first: {missing[0]!r})",
                   "use a complete model (every weight its config.json asks for)")
    return cpu_offload(model.eval(), torch.device("cpu"), state_dict=weights)
