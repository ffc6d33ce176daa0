"""lora-tune's own LoRA layer (model/lora_function.py) against peft's: the same outputs and gradients, in float32 to
1e-6 and in bfloat16 within its rounding, with dropout drawing the same mask; and only where it applies."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import CONFIGS
from lora_tuner.model.lora_function import dropout_keep, fused_lora_layers, fusable


class SameMaskDropout(torch.nn.Module):
    """Dropout for peft's own path that draws its masks as lora-tune's layer does, so both can be compared exactly."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        keep, p = dropout_keep(x.shape, self.p, x.device)
        return x * keep.to(x.dtype).div_(1 - p)  # as torch's dropout scales its mask


IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def peft_model(dtype: torch.dtype, dropout: float):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIGS["llama"]), dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                            init_lora_weights=False))
    for name, parameter in model.named_parameters():
        if "lora_" in name:  # peft keeps adapters in fp32 over a 16-bit base (autocast_adapter_dtype)
            assert parameter.dtype == torch.float32
    return model.train()


def step(model, fused: bool):
    """Logits, the LoRA weights' gradients and the embedding output's gradient of one forward and backward."""
    model.zero_grad()
    embeddings = model.get_input_embeddings()(IDS).detach().requires_grad_()
    torch.manual_seed(1)  # the dropout masks
    if fused:
        with fused_lora_layers(model) as count:
            assert count == 14  # q, k, v, o, gate, up, down in each of 2 layers
            logits = model(inputs_embeds=embeddings).logits
    else:
        logits = model(inputs_embeds=embeddings).logits
    logits.float().pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.float(), grads, embeddings.grad.float()


def relative(found: torch.Tensor, want: torch.Tensor) -> float:
    found, want = found.detach().float(), want.detach().float()
    return float((found - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_in_float32_it_computes_what_peft_computes(dropout):
    model = peft_model(torch.float32, dropout)
    dropouts = {name: module.lora_dropout["default"] for name, module in model.named_modules() if fusable(module)}
    if dropout:
        for name, module in model.named_modules():
            if fusable(module):
                module.lora_dropout["default"] = SameMaskDropout(dropout)
    want_logits, want_grads, want_input = step(model, fused=False)
    for name, module in model.named_modules():  # the fused layer reads p from peft's own dropout modules
        if fusable(module):
            module.lora_dropout["default"] = dropouts[name]
    logits, grads, input_grad = step(model, fused=True)
    assert set(grads) == set(want_grads) and all(".lora_" in name for name in grads)  # frozen weights get none
    assert relative(logits, want_logits) <= 1e-6
    assert relative(input_grad, want_input) <= 1e-6
    assert max(relative(grads[name], want_grads[name]) for name in grads) <= 1e-6
    assert all(grads[name].dtype == torch.float32 for name in grads)  # the optimizer's state stays fp32


def test_in_bfloat16_it_is_as_close_to_float32_as_peft_is():
    """peft computes the LoRA branch in fp32 over a bf16 base; this layer in bf16 (A and B rounded to bf16). Against
    the same model in float32, its logits and gradients are as close as peft's (measured: logits 3.8% vs 3.6% of the
    largest, input gradients 3.4% vs 5.9%, LoRA gradients 5.7% vs 8.5%); a wrong scale or transpose is off by O(1)."""
    want_logits, want_grads, want_input = step(peft_model(torch.float32, 0.0), fused=False)
    model = peft_model(torch.bfloat16, 0.0)
    peft_logits, peft_grads, peft_input = step(model, fused=False)
    logits, grads, input_grad = step(model, fused=True)
    assert relative(logits, want_logits) <= 1.25 * relative(peft_logits, want_logits)
    assert relative(input_grad, want_input) <= 1.25 * relative(peft_input, want_input)
    ours = max(relative(grads[name], want_grads[name]) for name in grads)
    assert ours <= 1.25 * max(relative(peft_grads[name], want_grads[name]) for name in grads) and ours < 0.15


def test_it_applies_to_16_bit_layers_only_and_leaves_peft_as_it_was(tmp_path):
    model = peft_model(torch.float32, 0.0)
    layers = [m for m in model.modules() if fusable(m)]
    with fused_lora_layers(model):
        assert all("forward" in vars(layer) for layer in layers)
        with model.disable_adapter():  # a state it does not handle goes to peft's own forward
            plain = model(input_ids=IDS).logits
    assert not any("forward" in vars(layer) for layer in layers)  # peft's forward again afterwards
    with model.disable_adapter():
        assert torch.equal(plain, model(input_ids=IDS).logits)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_masks_drop_the_share_asked_for_independently_per_value(p):
    torch.manual_seed(0)
    keep, drawn = dropout_keep(torch.Size([513, 333]), p, torch.device("cpu"))  # not a multiple of 4 values
    assert keep.dtype == torch.bool and keep.shape == (513, 333) and abs(drawn - p) <= 0.5 / 65536
    count = keep.numel()
    assert abs(float(1 - keep.float().mean()) - drawn) <= 5 * math.sqrt(drawn * (1 - drawn) / count)
    lanes = keep.flatten()[: count // 4 * 4].view(-1, 4).float().mean(0)  # each 16-bit quarter of a draw alike
    assert (lanes - (1 - drawn)).abs().max() <= 5 * math.sqrt(drawn * (1 - drawn) / (count // 4))
    again, _ = dropout_keep(torch.Size([513, 333]), p, torch.device("cpu"))  # a fresh draw, independent of the first
    same = 1 - 2 * drawn * (1 - drawn)
    assert abs(float((keep == again).float().mean()) - same) <= 5 * math.sqrt(same * (1 - same) / count)
