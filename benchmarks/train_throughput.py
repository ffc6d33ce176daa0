"""Training throughput: lora-tune against the plain stacks users would otherwise run, on the same rows.

Every contender trains the same LoRA (r16, alpha 32, dropout 0.05, all linear layers) on the same real Alpaca rows
with the same tokenizer, model and response-only loss, each set up the way its own docs recommend (README.md of this
folder says why), in its own process. Contenders take turns, in a rotating order, over several rounds with a fixed
thread count. Each is measured over its steady-state steps only (after warm-up steps): real (non-padding) tokens per
wall second and per CPU second, and the process's peak RSS.

Each contender runs in its fastest dtype: a calibration round tries bf16 (base weights bf16, autocast) and fp32 for
every plain-stack contender and keeps the faster; lora-tune runs as its `dtype: auto` decides.

    python benchmarks/train_throughput.py --shape tiny            # tiny LLaMA shape, random weights, 32k vocab
    python benchmarks/train_throughput.py --shape smollm2         # real SmolLM2-135M weights (../shared)
    python benchmarks/train_throughput.py --shape tiny --ablation # lora-tune with each fast-path switch off in turn
    python benchmarks/train_throughput.py --shape smollm2 --ablation --only "all on (recipe defaults);peft's LoRA \
layer instead of lora-tune's"                                   # some rows only (written to ...-part.json)
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
MAX_LENGTH = 512

# name -> (what it is, dtypes it is tried in)
CONTENDERS = {
    "lora-tune": ("lora-tune run, recipe defaults (dtype auto, packing, response loss, batch auto)", ("auto",)),
    "trl-defaults": ("TRL SFTTrainer at its defaults: batch 8, padded, gradient checkpointing", ("bf16", "fp32")),
    "trl-packing": ("TRL, packing (bfd) as its docs recommend, batch 2, checkpointing on", ("bf16", "fp32")),
    "trl-padding-free": ("TRL, padding_free=True, batch 8, no checkpointing", ("bf16", "fp32")),
    "trl-lora-tune-settings": ("TRL with lora-tune's settings: packing bfd, batch 2, no checkpointing",
                               ("bf16", "fp32")),
    "trainer-alpaca-lora": ("transformers Trainer, alpaca-lora style: pad to longest, group_by_length, micro batch 4, "
                            "no checkpointing", ("bf16", "fp32")),
}
# lora-tune with one fast-path switch turned off (recipe overrides)
ABLATION = {
    "all on (recipe defaults)": {},
    "response loss off (TRL's loss path)": {"train": {"response_loss": False}},
    "peft's LoRA layer instead of lora-tune's": {"train": {"fused_lora": False}},
    "LoRA dropout 0 (no masks to draw)": {"lora": {"dropout": 0.0}},
    "fp32 instead of bf16": {"model": {"dtype": "float32"}},
    "transformers' SDPA instead of packed SDPA": {"model": {"attn_implementation": "sdpa"}},
    "packing off": {"data": {"packing": False}},
    "torch.compile on": {"train": {"compile": True}},
    "all off (TRL's loss, peft's layer, fp32, SDPA, no packing)": {
        "train": {"response_loss": False, "fused_lora": False},
        "model": {"dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"packing": False}},
}


def base_folder(shape: str) -> Path:
    """The model, saved once: the tiny shape with random weights, SmolLM2 as its real (dequantized) weights."""
    folder = HERE / ".cache" / "train" / shape
    if not (folder / "config.json").is_file():
        if shape == "smollm2":
            from lora_tuner.model.gguf_import import import_gguf

            import_gguf(GGUF, folder)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY)).save_pretrained(folder)
    return folder


def tokenizer_of(shape: str) -> str:
    return str(SHARED / "tokenizers/llama/tokenizer.model") if shape == "tiny" else str(base_folder(shape))


class Meter:
    """A TrainerCallback (built lazily, so importing this file imports no transformers) timing steps warmup+1..end."""

    def __new__(cls, warmup: int):
        from transformers import TrainerCallback

        class _Meter(TrainerCallback):
            def __init__(self):
                self.start = self.end = None

            def on_step_end(self, args, state, control, **kwargs):
                mark = (time.perf_counter(), time.process_time(), int(state.num_input_tokens_seen))
                if state.global_step == warmup:
                    self.start = mark
                elif state.global_step > warmup:
                    self.end = mark

            def numbers(self) -> dict:
                (wall0, cpu0, tokens0), (wall1, cpu1, tokens1) = self.start, self.end
                tokens = tokens1 - tokens0
                return {"tokens": tokens, "tokens_per_s": tokens / (wall1 - wall0),
                        "tokens_per_cpu_s": tokens / (cpu1 - cpu0)}

        return _Meter()


def rows(args) -> list[dict]:
    """The same prompt/completion rows for everyone: Alpaca's template, lora-tune's checks (bad and too-long rows out)."""
    from lora_tuner import load_recipe
    from lora_tuner.data.prepare import prepare_data
    from lora_tuner.model.tokenizer import load_tokenizer

    recipe = load_recipe(write_recipe(args, {}))
    return [row.example for row in prepare_data(recipe, load_tokenizer(recipe.model)).train]


def write_recipe(args, overrides: dict) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": str(base_folder(args.shape)), "tokenizer": tokenizer_of(args.shape)},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"path": str(SHARED / "data/alpaca_5000.json"), "limit": args.rows, "max_length": MAX_LENGTH},
        "train": {"max_steps": args.warmup + args.steps, "logging_steps": 10**6, "save_steps": 10**6, "report_to": []},
        "output": {"name": "bench"},
    }
    for section, values in overrides.items():
        recipe[section].update(values)
    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_lora_tune(args, overrides: dict) -> dict:
    from lora_tuner import load_recipe, run

    meter = Meter(args.warmup)
    result = run(load_recipe(write_recipe(args, overrides)), output=tempfile.mkdtemp() + "/run", callbacks=[meter],
                 log=lambda message: None)
    return {**meter.numbers(), "settings": result.manifest.fast_path}


def run_trl(args, contender: str, dtype: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lora_tuner.model.tokenizer import load_tokenizer
    from lora_tuner.config.schema import ModelSection

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(base_folder(args.shape)),
                                            tokenizer=tokenizer_of(args.shape)))
    settings = {
        "trl-defaults": {},
        "trl-packing": {"packing": True, "per_device_train_batch_size": 2},
        "trl-padding-free": {"padding_free": True, "max_length": None, "gradient_checkpointing": False},
        "trl-lora-tune-settings": {"packing": True, "packing_strategy": "bfd", "per_device_train_batch_size": 2,
                                   "gradient_checkpointing": False},
    }[contender]
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, use_cpu=True,
                       bf16=dtype == "bf16", report_to="none", save_strategy="no", logging_steps=10**6,
                       include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                       model_init_kwargs={"dtype": torch.bfloat16 if dtype == "bf16" else torch.float32},
                       **{"max_length": MAX_LENGTH, **settings})
    meter = Meter(args.warmup)
    trainer = SFTTrainer(model=str(base_folder(args.shape)), args=config, train_dataset=Dataset.from_list(rows(args)),
                         processing_class=tokenizer, peft_config=LoraConfig(**LORA), callbacks=[meter])
    trainer.train()
    return {**meter.numbers(), "settings": {k: str(v) for k, v in settings.items()}}


def run_trainer(args, dtype: str) -> dict:
    """alpaca-lora's finetune.py: prompt + output tokenized together, the prompt's labels masked, padded to the
    longest row of a length-grouped batch by DataCollatorForSeq2Seq, a plain transformers Trainer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lora_tuner.config.schema import ModelSection
    from lora_tuner.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(base_folder(args.shape)),
                                            tokenizer=tokenizer_of(args.shape)))

    def tokenize(example):
        prompt = tokenizer(example["prompt"])["input_ids"]
        full = tokenizer(example["prompt"] + example["completion"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": [-100] * len(prompt) + full[len(prompt):]}

    data = Dataset.from_list(rows(args)).map(tokenize, remove_columns=["prompt", "completion"])
    model = AutoModelForCausalLM.from_pretrained(base_folder(args.shape),
                                                 dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    meter = Meter(args.warmup)
    trainer = Trainer(
        model=model, train_dataset=data, callbacks=[meter],
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        args=TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps,
                               per_device_train_batch_size=4, train_sampling_strategy="group_by_length",
                               use_cpu=True, bf16=dtype == "bf16",
                               report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                               include_num_input_tokens_seen="non_padding", learning_rate=3e-4))
    trainer.train()
    return {**meter.numbers(), "settings": {"micro_batch": 4, "group_by_length": True}}


def one(args) -> None:
    """One contender in this process; prints its JSON line last."""
    torch.set_num_threads(args.threads)
    if args.contender == "lora-tune":
        numbers = run_lora_tune(args, json.loads(args.overrides))
    elif args.contender == "trainer-alpaca-lora":
        numbers = run_trainer(args, args.dtype)
    else:
        numbers = run_trl(args, args.contender, args.dtype)
    numbers["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(numbers))


def measure(args, contender: str, dtype: str, overrides: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--shape", args.shape, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--rows", str(args.rows), "--threads", str(args.threads), "--contender", contender,
               "--dtype", dtype, "--overrides", json.dumps(overrides or {})]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise SystemExit(f"{contender} ({dtype}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def contest(args) -> dict:
    dtypes = {}
    chosen = {name: CONTENDERS[name] for name in (args.contenders.split(",") if args.contenders else CONTENDERS)}
    for name, (_, tried) in chosen.items():  # calibration: each plain stack in its faster dtype
        if len(tried) == 1:
            dtypes[name] = {"chosen": tried[0]}
            continue
        trial = {dtype: measure(args, name, dtype)["tokens_per_cpu_s"] for dtype in tried}
        dtypes[name] = {"chosen": max(trial, key=trial.get), "calibration_tokens_per_cpu_s": trial}
        print(f"calibration {name}: " + ", ".join(f"{d} {v:,.0f}" for d, v in trial.items()), flush=True)
    runs = {name: [] for name in chosen}
    names = list(chosen)
    for round_number in range(args.rounds):
        order = names[round_number % len(names):] + names[:round_number % len(names)]  # rotate who goes first
        for name in order:
            runs[name].append(measure(args, name, dtypes[name]["chosen"]))
            print(f"round {round_number + 1} {name}: {runs[name][-1]['tokens_per_cpu_s']:,.0f} tokens/CPU-s", flush=True)
    return {"dtypes": dtypes, "runs": runs}


def ablation(args) -> dict:
    rows = {name: ABLATION[name] for name in (args.only.split(";") if args.only else ABLATION)}
    runs = {name: [] for name in rows}
    for round_number in range(args.rounds):
        for name, overrides in rows.items():
            runs[name].append(measure(args, "lora-tune", "auto", overrides))
            print(f"round {round_number + 1} {name}: {runs[name][-1]['tokens_per_cpu_s']:,.0f} tokens/CPU-s", flush=True)
    return {"runs": runs}


def summary(runs: list[dict]) -> dict:
    def stats(key):
        values = [r[key] for r in runs]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {"tokens_per_s": stats("tokens_per_s"), "tokens_per_cpu_s": stats("tokens_per_cpu_s"),
            "peak_rss_gb": stats("peak_rss_gb"), "settings": runs[0]["settings"]}


def report(args, found: dict) -> None:
    from lora_tuner.train.manifest import device as machine, git_commit, versions

    table = {name: summary(runs) for name, runs in found["runs"].items()}
    device = f"cpu-{os.cpu_count()}cores" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"\n{args.shape}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps after {args.warmup} "
          f"warm-up; median (min-max)")
    print(f"{'':40s} {'tokens/CPU-s':>22s} {'tokens/s':>22s} {'peak RSS GB':>12s}")
    for name, row in table.items():
        cpu, wall = row["tokens_per_cpu_s"], row["tokens_per_s"]
        print(f"{name:40s} {cpu['median']:8,.0f} ({cpu['min']:,.0f}-{cpu['max']:,.0f}) "
              f"{wall['median']:8,.0f} ({wall['min']:,.0f}-{wall['max']:,.0f}) {row['peak_rss_gb']['median']:12.2f}")
    result = {"device": device, "machine": machine(), "platform": platform.platform(), "shape": args.shape,
              "threads": args.threads,
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "rows": args.rows,
              "max_length": MAX_LENGTH, "table": table, "raw": found, "versions": versions(), "commit": git_commit()}
    if not args.ablation:
        others = {name: row for name, row in table.items() if name != "lora-tune"}
        best = max(others, key=lambda name: others[name]["tokens_per_cpu_s"]["median"])
        ours = table["lora-tune"]
        result.update(
            fastest_contender=best,
            speedup_vs_best=ours["tokens_per_cpu_s"]["median"] / others[best]["tokens_per_cpu_s"]["median"],
            rss_vs_best=ours["peak_rss_gb"]["median"] / others[best]["peak_rss_gb"]["median"],
            contenders={name: CONTENDERS[name][0] for name in table})
        print(f"fastest contender: {best}; speedup_vs_best {result['speedup_vs_best']:.2f}, "
              f"rss_vs_best {result['rss_vs_best']:.2f}")
    kind = "ablation" if args.ablation else "contest"
    part = "-part" if (args.ablation and args.only) or (not args.ablation and args.contenders) else ""
    out = HERE / "results" / f"train-{kind}-{device.replace(' ', '_')}-{args.shape}{part}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, help="measured steps (default: 30 tiny, 6 smollm2)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000, help="Alpaca rows read")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--only", help="ablation rows to run, ';'-separated names (default: all)")
    parser.add_argument("--contenders",
                        help="contest: these contenders only, comma-separated, lora-tune among them (default: all)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (30 if args.shape == "tiny" else 6)
    if args.contender:
        return one(args)
    base_folder(args.shape)
    report(args, ablation(args) if args.ablation else contest(args))


if __name__ == "__main__":
    main()
