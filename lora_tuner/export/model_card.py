"""README.md for a merged export: where it came from and how it was checked."""


def model_card(report: dict) -> str:
    verification = report.get("verification")
    checked = ("not run (--no-verify)" if verification is None else
               f"{'passed' if verification['passed'] else 'FAILED'}: max |logit diff| "
               f"{verification['max_abs_logit_diff']:.3g}, mean KL {verification['mean_kl']:.3g} over "
               f"{verification['prompts']} prompts, against the {verification['reference']}")
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [lora-tune, merged-lora]",
        "---",
        "# Merged LoRA model",
        "",
        "Standalone weights: a LoRA adapter folded into its base by `lora-tune merge`. Load with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{report['base']}` |",
        f"| adapter | `{report['adapter']}` |",
        f"| recipe sha256 | `{report['recipe_sha256']}` |",
        f"| base quantization in training | {report['base_quantization']} |",
        f"| merged into | {report['into']} weights |",
        f"| dtype | {report['dtype']} |",
        f"| verification | {checked} |",
        "",
    ])
