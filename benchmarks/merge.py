"""Merge benchmark: `lora-tune merge` vs peft's merge_and_unload + save_pretrained vs `cp -r` (the I/O floor).

Builds once (cached in benchmarks/.cache) a LLaMA-shaped random base in bf16 (~1.1B parameters, or ~3.4B with
--model 3b), saved in several shards, and an r=16 all-linear adapter; then times each method in its own process and
reads that process's peak RSS. Methods take turns, --repeats times, each after a `sync` so none pays for the previous
one's writeback; medians are reported. `python -c "import torch"` is timed too: no torch-based command can finish
faster.

    python benchmarks/merge.py [--model 1b|3b] [--shard-size 1GB] [--repeats 3]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "merge"
RESULTS = HERE / "results"
# TinyLlama's shape (the ~1B the merge issue names) and OpenLLaMA-3B's: the start-up cost is fixed, so the larger
# model shows how it weighs as models grow.
MODELS = {
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "3b": dict(model_type="llama", hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
}

BUILD = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{config}), dtype=torch.bfloat16)
model.save_pretrained({base!r}, max_shard_size={shard!r})
peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
peft.save_pretrained({adapter!r})
"""
BASELINE = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
PeftModel.from_pretrained(base, {adapter!r}).merge_and_unload().save_pretrained({out!r})
"""
TORCH_STARTUP = "import torch"


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def machine() -> str:
    """lora_tuner's manifest.device(), computed in a child: with torch imported here, every child measured after
    would report this process's memory as part of its own peak RSS (a forked child's peak counts its parent's pages)."""
    return subprocess.run([sys.executable, "-c", "from lora_tuner.train.manifest import device; print(device())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def build(model: str, shard: str) -> tuple[Path, Path]:
    cache = CACHE / model
    base, adapter = cache / f"base-{shard}", cache / "adapter"
    if not (base / "config.json").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        print(f"building the {model} random base and adapter (once)...", flush=True)
        script = BUILD.format(config=MODELS[model], base=str(base), shard=shard, adapter=str(adapter))
        subprocess.run([sys.executable, "-c", script], check=True)
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="1b", help="LLaMA shape to build")
    parser.add_argument("--shard-size", default="1GB", help="base and output shard size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (medians are reported)")
    args = parser.parse_args()
    base, adapter = build(args.model, args.shard_size)
    config = MODELS[args.model]
    shards = sorted(base.glob("*.safetensors"))
    largest_mb = max(p.stat().st_size for p in shards) / 2**20
    model_mb = sum(p.stat().st_size for p in shards) / 2**20
    out = CACHE / args.model / "out"
    measure(["cat", *map(str, shards)])  # warm the page cache so every method reads from memory

    methods = {
        "copy (cp -r)": ["cp", "-r", str(base), str(out)],
        "lora-tune merge": [sys.executable, "-m", "lora_tuner.cli", "merge", str(adapter), "--out", str(out),
                            "--base", str(base), "--shard-size", args.shard_size, "--no-verify", "--dtype", "bf16"],
        "peft merge_and_unload": [sys.executable, "-c",
                                  BASELINE.format(base=str(base), adapter=str(adapter), out=str(out))],
        "python + torch start-up": [sys.executable, "-c", TORCH_STARTUP],
    }
    runs, in_process = {name: [] for name in methods}, []
    for _ in range(args.repeats):
        for name, command in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            runs[name].append(measure(command))
            if name == "lora-tune merge":  # merge() itself: after the imports, before the interpreter exits
                in_process.append(json.loads((out / "merge_report.json").read_text())["seconds"])
    shutil.rmtree(out, ignore_errors=True)

    rows = {name: {"seconds": round(statistics.median(s for s, _ in done), 2),
                   "peak_rss_mb": round(statistics.median(r for _, r in done)),
                   "all_seconds": [round(s, 2) for s, _ in done]} for name, done in runs.items()}
    for name, row in rows.items():
        print(f"{name:26s} {row['seconds']:7.2f} s {row['peak_rss_mb']:7d} MB   runs: {row['all_seconds']}")
    in_process_seconds = statistics.median(in_process)
    print(f"{'  of which merge() itself':26s} {in_process_seconds:7.2f} s")

    ours, copy, baseline = rows["lora-tune merge"], rows["copy (cp -r)"], rows["peft merge_and_unload"]
    startup = rows["python + torch start-up"]
    result = {
        "device": machine(),
        "model": f"LLaMA-shaped {config['num_hidden_layers']} layers x {config['hidden_size']}, bf16, "
                 f"{model_mb:.0f} MB in {len(shards)} shards", "adapter": "r=16 all-linear",
        "largest_shard_mb": round(largest_mb), "repeats": args.repeats, "methods": rows,
        "time_vs_copy": round(ours["seconds"] / copy["seconds"], 2),
        "in_process_seconds": round(in_process_seconds, 2),
        "in_process_time_vs_copy": round(in_process_seconds / copy["seconds"], 2),
        "torch_startup_vs_copy": round(startup["seconds"] / copy["seconds"], 2),
        "rss_vs_largest_shard": round(ours["peak_rss_mb"] / largest_mb, 2),
        "rss_above_torch_startup_vs_largest_shard": round((ours["peak_rss_mb"] - startup["peak_rss_mb"]) / largest_mb,
                                                          2),
        "time_vs_baseline": round(ours["seconds"] / baseline["seconds"], 2),
        "rss_vs_baseline": round(ours["peak_rss_mb"] / baseline["peak_rss_mb"], 2),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "methods"}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"merge-{platform.node()}-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
