"""Quality is not the price of speed: the same recipe on the real SmolLM2-135M weights trained twice, once with every
fast-path switch on (bf16 compute where the CPU has it, response-only loss, packed SDPA, lora-tune's LoRA layer) and
once plain (fp32, the model's own loss, transformers' SDPA, peft's LoRA layer), from the same seed on the same rows;
the held-out response loss of the two adapters must agree within 2% (tests/test_fast_path.py: the same on the tiny
shape).

    python benchmarks/fast_path_quality.py              # 40 steps each, ~15 minutes on 2 cores
    python benchmarks/fast_path_quality.py --compare dropout   # LoRA dropout 0.05 against 0, both on the fast path
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

from train_throughput import HERE, SHARED, base_folder

from lora_tuner import load_recipe, run
from lora_tuner.config.bundled import recipe_file

TOLERANCE = 0.02
SWITCHES = {
    "fast path (recipe defaults)": {},
    "plain fp32 (model's own loss, SDPA, peft's layer)": {"model": {"dtype": "float32", "attn_implementation": "sdpa"},
                                                          "train": {"response_loss": False, "fused_lora": False}},
}
# Dropout's masks are the largest single cost of a fast-path step on CPU (benchmarks/README.md): is it worth them?
DROPOUT = {
    "LoRA dropout 0.05": {"lora": {"dropout": 0.05}},
    "LoRA dropout 0": {"lora": {"dropout": 0.0}},
}


def recipe_for(steps: int, overrides: dict):
    """The bundled SmolLM2 recipe, offline: the weights imported from ../shared's GGUF, the rows from ../shared."""
    import yaml

    recipe = yaml.safe_load(recipe_file("smollm2-135m-alpaca").read_text())
    recipe["model"]["name_or_path"] = str(base_folder("smollm2"))
    recipe["data"]["path"] = str(SHARED / "data/alpaca_5000.json")
    recipe["train"].update(max_steps=steps, eval_steps=10**6, save_steps=10**6, warmup=0.1)
    for section, values in overrides.items():
        recipe[section].update(values)
    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compare", choices=["fast-path", "dropout"], default="fast-path")
    args = parser.parse_args()
    runs = SWITCHES if args.compare == "fast-path" else DROPOUT
    found = {}
    for name, overrides in runs.items():
        manifest = run(recipe_for(args.steps, overrides), output=tempfile.mkdtemp() + "/run",
                       log=lambda message: None).manifest
        found[name] = {"eval_start": manifest.loss.eval_start, "eval": manifest.loss.eval,
                       "tokens_per_s": manifest.train.tokens_per_s, "settings": manifest.fast_path}
        print(f"{name:40s} held-out loss {manifest.loss.eval_start:.4f} -> {manifest.loss.eval:.4f}, "
              f"{manifest.train.tokens_per_s:,.0f} tokens/s", flush=True)
    fast, plain = (found[name]["eval"] for name in runs)
    gap = abs(fast - plain) / plain
    verdict = "within" if gap < TOLERANCE else "NOT within"
    print(f"relative gap {gap:.2%}: {verdict} {TOLERANCE:.0%}")
    device = f"cpu-{os.cpu_count()}cores"
    out = HERE / "results" / f"{'fast-path' if args.compare == 'fast-path' else 'dropout'}-quality-{device}-smollm2.json"
    out.write_text(json.dumps({"device": device, "steps": args.steps, "runs": found, "relative_gap": gap,
                               "tolerance": TOLERANCE}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
