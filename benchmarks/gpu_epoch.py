"""One Stanford Alpaca epoch of the bundled LLaMA-7B recipes, measured: training tokens/s, minutes per epoch and peak
memory, against what `lora-tune plan` predicts for the same device.

Nothing is downloaded: the base has the recipe's shape with random weights (model.init: random; speed and memory do
not depend on the values), the tokenizer is the LLaMA tokenizer from ../shared and the rows are the shared Alpaca rows,
so the packed lengths follow the real data. Each recipe runs --steps steps through `lora-tune run`'s own code (its fast
path, quantization and defaults); tokens/s is the run's own figure, and one epoch (52,002 rows x 128 tokens, as `plan`
counts it) is extrapolated from it. On a GPU the LLaMA-7B shape is the default; `--shape tiny` runs the same code on
a 2-layer model of the same widths' kind in seconds on a CPU, which the test suite does, so every line here runs
without a GPU.

    python benchmarks/gpu_epoch.py [--recipes llama-7b-lora-alpaca,llama-7b-qlora-alpaca] [--shape llama-7b] [--steps 30]
"""
import argparse
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
SHAPES = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=288, max_position_embeddings=2048),
}
# the LLaMA tokenizer for the real shape; the tiny check uses the byte tokenizer, which loads at once (the LLaMA
# one is converted to a fast tokenizer on every load: seconds each time on a CPU)
TOKENIZERS = {"llama-7b": str(SHARED / "tokenizers" / "llama"), "tiny": "bytes"}
EPOCH = "tatsu-lab/alpaca"  # plan counts its epoch from KNOWN_DATA


def device_name() -> tuple[str, str]:
    """(name for plan's --device, description): a known GPU by its name, else this CPU."""
    from lora_tuner.plan.devices import GPUS

    if not torch.cuda.is_available():
        return "cpu", f"cpu-{os.cpu_count()}cores ({torch.backends.cpu.get_cpu_capability()})"
    full = torch.cuda.get_device_name()
    found = [name for name in GPUS if re.search(name.split("-")[0], full, re.IGNORECASE)]
    return (found[0] if found else "h100"), full


def measure(recipe_name: str, shape: str, steps: int, data: Path, work: Path, rows: int, batch: int | None) -> dict:
    from lora_tuner import load_recipe, run
    from lora_tuner.plan.estimate import make_plan

    plan_device, described = device_name()
    overrides = ["model.init=random", f"model.config={json.dumps(SHAPES[shape])}", "model.name_or_path=null",
                 f"model.tokenizer={TOKENIZERS[shape]}", f"data.path={data}", f"data.limit={rows}",
                 "data.validation_size=8",
                 f"train.max_steps={steps}", f"train.eval_steps={steps * 10}", f"train.save_steps={steps * 10}",
                 f"train.logging_steps={max(1, steps // 5)}", "train.report_to=[]"]
    if batch:  # a quick check on a CPU; a GPU measures the recipe's own batch
        overrides += [f"train.batch_size={batch}", "train.gradient_accumulation=1"]
    recipe = load_recipe(recipe_name, overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run(recipe, output=str(work / recipe_name), log=lambda line: None)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024)
    measured = result.manifest.train.tokens_per_s
    epoch_plan = make_plan(recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": EPOCH}),
                                                     "train": recipe.train.model_copy(update={"max_steps": None})}),
                           plan_device)
    predicted = 1 / epoch_plan.seconds_per_token
    epoch_tokens = epoch_plan.data.tokens
    return {"device": described, "shape": shape, "steps": steps, "tokens_per_s": round(measured),
            "minutes_per_epoch": round(epoch_tokens / measured / 60, 1), "epoch_tokens": epoch_tokens,
            "plan_tokens_per_s": round(predicted), "plan_minutes_per_epoch": round(epoch_plan.seconds / 60, 1),
            "measured_vs_plan": round(measured / predicted, 2), "peak_memory_gb": round(peak / 1e9, 2),
            "plan_memory_gb": round(epoch_plan.total_bytes / 1e9, 2), "fast_path": result.manifest.fast_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="llama-7b-lora-alpaca,llama-7b-qlora-alpaca")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-7b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed per recipe")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "alpaca_5000.json")
    parser.add_argument("--batch-size", type=int, help="instead of the recipe's (a quick check on a CPU)")
    parser.add_argument("--rows", type=int, default=5000, help="data rows read (packed lengths follow them)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-epoch-"))
    try:
        rows = {name: measure(name, args.shape, args.steps, args.data, work, args.rows, args.batch_size)
                for name in args.recipes.split(",")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'recipe':26s} {'tokens/s':>9s} {'plan':>8s} {'min/epoch':>10s} {'plan':>7s} {'peak GB':>8s} {'plan':>6s}")
    for name, row in rows.items():
        print(f"{name:26s} {row['tokens_per_s']:9,d} {row['plan_tokens_per_s']:8,d} {row['minutes_per_epoch']:10.1f} "
              f"{row['plan_minutes_per_epoch']:7.1f} {row['peak_memory_gb']:8.2f} {row['plan_memory_gb']:6.2f}")
    device = device_name()[1]
    result = {"device": device, "platform": platform.platform(), "torch": torch.__version__, "recipes": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = args.out / f"gpu-epoch-{slug}-{args.shape}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
