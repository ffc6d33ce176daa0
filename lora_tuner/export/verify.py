"""Prove an export: plain transformers on the merged folder vs base + adapter, on a few prompts."""
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ..config.schema import ModelSection, QuantizationSection
from ..model.loading import load_base
from .prompts import verification_prompts

# max |logit diff| / max |logit| allowed, by the merged dtype: fp32 arithmetic only reorders sums; 16-bit
# rounding of every merged weight moves logits by up to ~1-2% of their range.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def compare(export_folder, reference_base, adapter_folder, prompts: list[list[int]]) -> dict:
    """Next-token distributions of the export vs the adapter on its reference base."""
    merged = AutoModelForCausalLM.from_pretrained(export_folder, dtype="auto").eval()
    reference = PeftModel.from_pretrained(reference_base, adapter_folder).eval()
    max_diff = max_logit = kl_sum = 0.0
    tokens = 0
    with torch.no_grad():
        for ids in prompts:
            batch = torch.tensor([ids])
            got = merged(input_ids=batch).logits[0].float()
            want = reference(input_ids=batch.to(reference.device)).logits[0].float().cpu()
            max_diff = max(max_diff, (got - want).abs().max().item())
            max_logit = max(max_logit, want.abs().max().item())
            kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="sum")
            kl_sum, tokens = kl_sum + kl.item(), tokens + len(ids)
    return {"max_abs_logit_diff": max_diff, "max_abs_logit": max_logit,
            "relative_diff": max_diff / max(max_logit, 1e-6), "mean_kl": max(kl_sum / tokens, 0.0),  # not < 0 by rounding
            "prompts": len(prompts)}


def verify_export(work, base_folder, adapter, recipe, quantization, into: str, out_dtype, source: str) -> dict:
    """Compare the export with the adapter on the base it claims to merge into (the 4-bit one for dequantized)."""
    reference_quantization = quantization if into == "dequantized" else QuantizationSection()
    dtype = str(out_dtype).removeprefix("torch.")
    reference = load_base(ModelSection(name_or_path=str(base_folder), dtype=dtype), reference_quantization,
                          str(base_folder), source)
    numbers = compare(work, reference, adapter, verification_prompts(recipe, work))
    tolerance = TOLERANCE[out_dtype]
    return {**numbers, "tolerance": tolerance, "passed": numbers["relative_diff"] <= tolerance,
            "reference": f"adapter on the {'quantized' if into == 'dequantized' else 'full-precision'} base"}
