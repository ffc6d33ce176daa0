"""Adapter hot-swap latency (AdapterPool) vs reloading the base with the other adapter (what users do without it).

Two shapes in one run: a tiny LLaMA and a ~1.1B LLaMA (random weights, built once into benchmarks/.cache).

    python benchmarks/hotswap.py
"""
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lora_tuner import AdapterPool  # noqa: E402
from lora_tuner.model.tokenizer import byte_tokenizer  # noqa: E402
from lora_tuner.train.manifest import device  # noqa: E402

CACHE = HERE / ".cache" / "hotswap"
SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=288),
    "llama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}


def build(name: str, config: dict) -> tuple[Path, list[Path]]:
    folder = CACHE / name
    base, adapters = folder / "base", [folder / f"adapter-{i}" for i in range(2)]
    if not (adapters[-1] / "adapter_config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
        model.save_pretrained(base)
        byte_tokenizer().save_pretrained(base)
        for seed, path in enumerate(adapters):
            torch.manual_seed(seed)
            lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
            get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(path)
    return base, adapters


def timed(action, repeats: int) -> float:
    """Median milliseconds of an action."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def measure(name: str, config: dict) -> dict:
    base, (a, b) = build(name, config)

    def switcher(max_loaded: int):
        pool = AdapterPool(str(base), dtype="bfloat16", max_loaded=max_loaded)
        pool.add("a", a)
        pool.add("b", b)
        names = iter(["a", "b"] * 1000)

        def switch():
            with pool.use(next(names)):
                pass
        return switch

    swap_ms = timed(switcher(max_loaded=2), 50)
    reread_ms = timed(switcher(max_loaded=1), 10)  # every switch evicts one adapter and re-reads the other

    def reload_base():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, b)

    reload_ms = timed(reload_base, 3)
    return {"swap_resident_ms": round(swap_ms, 3), "swap_from_disk_ms": round(reread_ms, 2),
            "reload_base_ms": round(reload_ms, 1), "reload_vs_swap": round(reload_ms / swap_ms)}


def main() -> None:
    results = {name: measure(name, config) for name, config in SHAPES.items()}
    print(f"{'model':12s} {'swap (resident)':>16s} {'swap (from disk)':>17s} {'reload base':>12s} {'ratio':>8s}")
    for name, row in results.items():
        print(f"{name:12s} {row['swap_resident_ms']:13.3f} ms {row['swap_from_disk_ms']:14.2f} ms "
              f"{row['reload_base_ms']:9.1f} ms {row['reload_vs_swap']:7d}x")
    out = HERE / "results" / f"hotswap-{platform.node()}.json"
    out.write_text(json.dumps({"device": device(), "dtype": "bfloat16", "adapter": "r=16 all-linear",
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
