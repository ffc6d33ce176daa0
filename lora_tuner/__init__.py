"""lora-tune: one-command, reproducible LoRA and QLoRA fine-tuning of open causal language models.

    from lora_tuner import load_recipe, run, merge, export_gguf, evaluate, AdapterPool
    result = run(load_recipe("recipes/demo-tiny-cpu.yaml"))
    report = merge(result.folder, "merged/demo")

(The GGUF export is `export_gguf`: the name `export` is the package lora_tuner.export, whose `export` function is what
`lora-tune export` runs.)
"""
import importlib

# Public name -> module. Imported on first use (PEP 562): trl alone takes seconds to import, and
# `lora-tune merge` or `validate` should not pay for what only training needs.
_API = {
    "Recipe": ".config", "load_recipe": ".config", "UserError": ".errors", "check_recipe": ".preflight",
    "RunResult": ".train.run", "run": ".train.run", "merge": ".export", "AdapterPool": ".adapters",
    "export_gguf": ".export", "export_gguf_lora": ".export", "evaluate": ".eval.evaluate",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lora_tuner' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name], __name__), name)
