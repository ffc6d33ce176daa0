"""README.md for a merged export: where it came from, how to prompt it, and how it was checked."""
from ..report import MergeReport


def model_card(report: MergeReport) -> str:
    v = report.verification
    if v is None:
        checked = "not run (--no-verify)"
    else:
        rows = f"{v.rows} {'held-out' if v.held_out else 'training'} rows ({v.tokens} response tokens)"
        kept = f", keeps {v.gain_kept:.1%} of the adapter's loss gain" if v.gain_kept is not None else ""
        checked = (f"{'passed' if v.passed else 'FAILED'} on {rows} against the {v.reference}: top-1 agreement "
                   f"{v.top1_agreement:.1%}, mean KL {v.mean_kl:.2e}, loss {v.loss_export:.4f} (adapter "
                   f"{v.loss_adapter:.4f}, base {v.loss_base:.4f}){kept}")
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [lora-tune, merged-lora]",
        "---",
        "# Merged LoRA model",
        "",
        "Standalone weights: a LoRA adapter folded into its base by `lora-tune merge`. Load with plain transformers;",
        "the tokenizer's chat template renders the prompt the model was trained on (a user message is the",
        "instruction, with an optional `input` key), and generation stops at the EOS training appended:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],',
        "                                    add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{report.base}` |",
        f"| adapter | `{report.adapter}` |",
        f"| recipe sha256 | `{report.recipe_sha256}` |",
        f"| base quantization in training | {report.base_quantization} |",
        f"| merged into | {report.into} weights ({report.into_reason}) |",
        f"| dtype | {report.dtype} ({report.dtype_reason}) |",
        f"| verification | {checked} |",
        "",
    ])
