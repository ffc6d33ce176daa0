"""Training throughput: lora-tune vs the plain stack (transformers + peft + trl SFTTrainer with their defaults:
no packing, gradient checkpointing on), same model shape, precision, LoRA config and real Alpaca rows.

Each side runs in its own process (clean peak-memory numbers); real (non-pad) tokens/s come from the Trainer's
own count. Prints a table and writes benchmarks/results/train-<device>-<model>-<quant>.json.

    python benchmarks/train_throughput.py                           # tiny LLaMA on CPU
    python benchmarks/train_throughput.py --model llama-7b --quant 4bit   # on a GPU
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
ALPACA_EPOCH_TOKENS = 52002 * 129  # measured: 129 LLaMA tokens per Alpaca example (README of this folder)
MODELS = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "llama-7b": "huggyllama/llama-7b",
    "gptj-6b": "EleutherAI/gpt-j-6b",
}


def base_folder(model: str) -> Path:
    """A random-weight base of the model's shape, saved once (speed and memory do not depend on the values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_tuner.plan.known_configs import KNOWN

    folder = HERE / ".cache" / "train" / model
    if not (folder / "config.json").is_file():
        config = MODELS[model] if isinstance(MODELS[model], dict) else KNOWN[MODELS[model]]
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            built = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
        built.save_pretrained(folder)
    return folder


def recipe(args, base: Path):
    from lora_tuner import load_recipe

    cuda = torch.cuda.is_available()
    raw = {
        "model": {"name_or_path": str(base), "dtype": "bfloat16" if cuda else "float32",
                  "tokenizer": str(args.tokenizer)},
        "quantization": {"mode": args.quant, "compute_dtype": "bfloat16" if cuda else "float32"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"path": str(args.data), "limit": args.rows, "max_length": 512},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "logging_steps": 5, "save_steps": 10**6,
                  "report_to": [], "optimizer": "adamw_torch_fused" if cuda else "adamw_torch",
                  "gradient_checkpointing": args.quant != "none" and args.model != "tiny" and cuda},
        "output": {"name": "bench"},
    }
    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def run_lora_tune(args, base: Path) -> dict:
    from lora_tuner import run

    result = run(recipe(args, base), output=tempfile.mkdtemp() + "/run")
    train = result.manifest["train"]
    return {"tokens_per_s": train["tokens_per_s"], "steps": train["steps"], "tokens": train["tokens"],
            "gradient_checkpointing": recipe(args, base).train.gradient_checkpointing, "packing": True}


def run_baseline(args, base: Path) -> dict:
    """transformers + peft + trl with their defaults; only what must be said is said (steps, batch, precision)."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lora_tuner.data.prepare import prepare_data
    from lora_tuner.model.tokenizer import load_tokenizer

    same = recipe(args, base)
    tokenizer = load_tokenizer(same.model, "benchmark")
    data = prepare_data(same, tokenizer, "benchmark")  # the very same prompt/completion rows
    cuda = torch.cuda.is_available()
    init = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if args.quant == "4bit":
        init["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=init["dtype"])
    # TRL's default batch (8 unpacked rows) is part of the baseline; --batch-size sets lora-tune's packed rows.
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, bf16=cuda, use_cpu=not cuda,
                       report_to="none", save_strategy="no", logging_steps=5,
                       include_num_input_tokens_seen="non_padding", model_init_kwargs=init)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(base), args=config, train_dataset=data.train, processing_class=tokenizer,
                         peft_config=lora)
    runtime = trainer.train().metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"tokens_per_s": tokens / runtime, "steps": trainer.state.global_step, "tokens": tokens,
            "gradient_checkpointing": config.gradient_checkpointing, "packing": config.packing}


def side(args) -> None:
    """One side, in this process; prints its JSON line last."""
    base = base_folder(args.model)
    numbers = (run_baseline if args.side == "baseline" else run_lora_tune)(args, base)
    if torch.cuda.is_available():
        numbers["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        numbers["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(numbers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--quant", choices=["none", "4bit"], default="none")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2, help="lora-tune's packed rows of 512 tokens per step")
    parser.add_argument("--rows", type=int, default=2000, help="Alpaca rows to read")
    parser.add_argument("--data", type=Path, default=SHARED / "data/alpaca_5000.json")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers/llama/tokenizer.model")
    parser.add_argument("--side", choices=["baseline", "lora-tune"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args)
    base_folder(args.model)
    results = {}
    for name in ("baseline", "lora-tune"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", name], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    report(args, results)


def report(args, results: dict) -> None:
    from lora_tuner.plan import GPUS
    from lora_tuner.plan.estimate import make_plan
    from lora_tuner.train.manifest import git_commit, versions

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu-{os.cpu_count()}cores"
    gpu = next((g for g in GPUS.values() if cuda and g.name.split("-")[0] in device.lower().replace(" ", "")), None)
    plan = make_plan(recipe(args, base_folder(args.model)), "benchmark", gpu.name if gpu else "h100")
    for name, row in results.items():
        passes = 3 if row["gradient_checkpointing"] else 2
        row["mfu"] = (row["tokens_per_s"] * 2 * plan.matmul_params * passes / (gpu.tflops * 1e12)) if gpu else None
        row["alpaca_epoch_minutes"] = ALPACA_EPOCH_TOKENS / row["tokens_per_s"] / 60
    speedup = results["lora-tune"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    print(f"{'':10s} {'tokens/s':>10s} {'MFU':>6s} {'peak GB':>8s} {'epoch min':>10s}  GC  packing")
    for name, row in results.items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"{name:10s} {row['tokens_per_s']:10.0f} {mfu:>6s} {row['peak_memory_gb']:8.2f} "
              f"{row['alpaca_epoch_minutes']:10.1f}  {row['gradient_checkpointing']!s:5s} {row['packing']}")
    print(f"speedup_vs_baseline {speedup:.2f}   (peak memory: {'GPU allocated' if cuda else 'process RSS'})")
    out = HERE / "results" / f"train-{device.replace(' ', '_')}-{args.model}-{args.quant}.json"
    out.write_text(json.dumps({
        "device": device, "platform": platform.platform(), "model": args.model, "quant": args.quant,
        "steps": args.steps, "lora_tune_batch_size": args.batch_size, "data": str(args.data), "results": results,
        "speedup_vs_baseline": speedup, "planned_peak_gb": plan.total_bytes / 1e9,
        "versions": versions(), "commit": git_commit(),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
