"""Scale benchmark: the default (verified) `lora-tune merge` and `lora-tune export --type q8_0` of a LLaMA-7B shape,
and the default merge of a GPT-J-6B shape, on this machine: time against `cp -r` of the base, peak RSS, and the
verification's share of the time.

The bases are random (no weights are downloaded), built tensor by tensor into ~2 GB bf16 shards: never a whole model
in memory. Each has the LLaMA SentencePiece tokenizer from ../shared (GPT-J's own BPE is not on disk; verification
only needs a tokenizer whose ids fit the vocabulary) and an r16 adapter on every linear layer of the decoder, saved
as peft saves one, with 8 Stanford Alpaca rows from ../shared as its held-out rows (validation.jsonl, as a run folder
keeps them). The weights' scales are chosen so that random logits are not near-ties everywhere (LAYER_STD below),
which would make top-1 agreement meaningless. Everything made is deleted at the end; ~34 GB of disk is needed at
the peak.

    python benchmarks/scale.py [--shapes llama-7b,gptj-6b] [--rounds 3] [--parts merge,export]

cp and merge --no-verify take turns --rounds times (medians, min-max); the verified merge and the export run once
(each is 10-20 minutes).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from merge import machine, measure  # the machine's name; wall seconds and peak RSS of one child process

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "scale"
RESULTS = HERE / "results"
SHARED = HERE.parents[1] / "shared"
SHAPES = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                     rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "gptj-6b": dict(model_type="gptj", n_embd=4096, n_inner=16384, n_layer=28, n_head=16, rotary_dim=64,
                    vocab_size=50400, n_positions=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}
TARGETS = {"llama-7b": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gptj-6b": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]}
SHARD_BYTES = 2 * 10**9
RANK, ALPHA, ROWS = 16, 32, 8
# Random decoder layers at the usual init (0.02) are chaotic: each amplifies what came in, so 8-bit rounding errors
# grow through 32 layers and random logits, near-ties everywhere, flip (q8_0 agreed on 91% of top-1 tokens after 2
# such layers). Trained models are not like that; here each layer is a small change to a residual stream carried by
# the embedding, so the top-1 agreement of an export measures its rounding, as on a real model.
LAYER_STD = 0.004


def build(shape: str, layers: int | None) -> None:
    """WORK/shape/base and WORK/shape/adapter, written tensor by tensor (`layers`: fewer decoder layers)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaTokenizer

    from lora_tuner.formats.templates import resolve
    from lora_tuner.formats.registry import FORMATS

    base, adapter = WORK / shape / "base", WORK / shape / "adapter"
    shutil.rmtree(WORK / shape, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    config = AutoConfig.for_model(**SHAPES[shape])
    if layers:
        config.num_hidden_layers = layers
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    torch.manual_seed(0)
    shard, index, size, lora = {}, {}, 0, {}
    head = skeleton.get_output_embeddings()

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, base / name, metadata={"format": "pt"})
        index.update({key: name for key in shard})
        shard, size = {}, 0

    embedding = skeleton.get_input_embeddings()
    for name, parameter in skeleton.named_parameters():
        std = 1.0 if parameter is embedding.weight else 0.02 if parameter is head.weight else LAYER_STD
        value = torch.ones(parameter.shape) if parameter.dim() == 1 else torch.randn(parameter.shape) * std
        shard[name] = value.to(torch.bfloat16)
        size += shard[name].nbytes
        module = name.removesuffix(".weight").split(".")[-1]
        if name.endswith(".weight") and module in TARGETS[shape]:
            stem = "base_model.model." + name.removesuffix(".weight")
            lora[f"{stem}.lora_A.weight"] = torch.randn(RANK, parameter.shape[1]) / parameter.shape[1] ** 0.5
            lora[f"{stem}.lora_B.weight"] = torch.randn(parameter.shape[0], RANK) * 0.002
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(base)
    LlamaTokenizer.from_pretrained(SHARED / "tokenizers" / "llama").save_pretrained(base)
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": TARGETS[shape], "base_model_name_or_path": str(base), "bias": "none"}))
    rows = json.loads((SHARED / "data" / "alpaca_5000.json").read_text())[-ROWS:]
    template = resolve("alpaca")
    with (adapter / "validation.jsonl").open("w") as out:
        for row in rows:
            example = FORMATS["alpaca"].to_example(row, template)
            out.write(json.dumps({**example, "held_out": True}) + "\n")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lora_tuner.cli", *args]


def run_shape(shape: str, parts: set[str], layers: int | None, rounds: int) -> dict:
    started = time.time()
    print(f"{shape}: building the random base and adapter...", flush=True)
    # built in a child: a child forked from a parent holding torch would report the parent's RSS as its own peak
    subprocess.run([sys.executable, __file__, "--build", shape, *(["--layers", str(layers)] if layers else [])],
                   check=True)
    base, adapter = WORK / shape / "base", WORK / shape / "adapter"
    built = time.time() - started
    base_gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    out, copy = WORK / shape / "merged", WORK / shape / "copy"
    runs: dict[str, list[dict]] = {}

    def timed(name: str, command: list[str], report: Path | None = None) -> dict:
        os.sync()
        seconds, rss = measure(command)
        row = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss)}
        if report is not None:
            row["report"] = json.loads(report.read_text())
        runs.setdefault(name, []).append(row)
        print(f"  {name:40s} {seconds:8.1f} s {rss:9.0f} MB", flush=True)
        return row

    merge = cli("merge", str(adapter), "--base", str(base), "--out", str(out))
    for _ in range(rounds):  # cp and the plain merge take turns, each after a sync
        timed("cp -r of the base", ["cp", "-r", str(base), str(copy)])
        shutil.rmtree(copy)
        timed("lora-tune merge --no-verify", merge + ["--no-verify"], out / "merge_report.json")
        shutil.rmtree(out)
    if "merge" in parts:
        timed("lora-tune merge (default: verified)", merge, out / "merge_report.json")
        shutil.rmtree(out)
    if "export" in parts:
        # the adapter folder names its base (adapter_config.json), so export merges it on the fly, verified
        gguf = WORK / shape / "model.gguf"
        export = cli("export", str(adapter), "--type", "q8_0", "--out", str(gguf))
        timed("lora-tune export --type q8_0 (verified)", export, gguf.with_suffix(".export_report.json"))
    shutil.rmtree(WORK / shape)
    methods = {name: median_row(rows) for name, rows in runs.items()}
    copy_s, plain = methods["cp -r of the base"]["seconds"], methods["lora-tune merge --no-verify"]
    result = {"base_gb": round(base_gb, 1), "build_seconds": round(built), "rounds": rounds, "methods": methods,
              "merge_no_verify_vs_cp": round(plain["seconds"] / copy_s, 2),
              "merge_itself_vs_cp": round(plain["merge_seconds"] / copy_s, 2)}
    if "merge" in parts:
        merged = methods["lora-tune merge (default: verified)"]
        verification = merged["report"]["verification"]
        result.update({"verification_share_of_merge": round(1 - plain["seconds"] / merged["seconds"], 2),
                       "verification": {key: verification[key] for key in (
                           "rows", "tokens", "top1_agreement", "mean_kl", "loss_rule", "passed")}})
    return result


def median_row(rows: list[dict]) -> dict:
    """Medians and spread of a method's rounds; merge_seconds: merge() itself, as its report times it."""
    seconds = [row["seconds"] for row in rows]
    row = {"seconds": statistics.median(seconds), "min_max_seconds": [min(seconds), max(seconds)],
           "peak_rss_mb": round(statistics.median(row["peak_rss_mb"] for row in rows))}
    if "report" in rows[0]:
        row["merge_seconds"] = round(statistics.median(r["report"]["seconds"] for r in rows), 1)
        row["report"] = rows[-1]["report"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-7b,gptj-6b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="turns of cp and merge --no-verify (medians)")
    parser.add_argument("--parts", default="merge,export", help="besides the rounds: merge (verified, once), export "
                        "(q8_0, verified, once; LLaMA shapes only)")
    parser.add_argument("--layers", type=int, help="fewer decoder layers (same widths): a quick check of the script")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # internal: build one shape in this process
    args = parser.parse_args()
    if args.build:
        return build(args.build, args.layers)
    if not (SHARED / "tokenizers" / "llama" / "tokenizer.model").is_file():
        raise SystemExit(f"needs the LLaMA tokenizer and Alpaca rows in {SHARED} (../shared beside the checkout)")
    result = {"device": f"cpu-{os.cpu_count()}cores", "cpu": machine(),
              "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9),
              "adapter": f"r{RANK} alpha {ALPHA}, every linear layer of the decoder", "verification_rows": ROWS,
              "shapes": {}}
    for shape in args.shapes.split(","):
        parts = set(args.parts.split(",")) - (set() if shape.startswith("llama") else {"export"})
        result["shapes"][shape] = run_shape(shape, parts, args.layers, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    suffix = (f"-{args.layers}-layers" if args.layers else "") + ("" if args.parts == "merge,export" else
                                                                  "-" + args.parts.replace(",", "-"))
    path = RESULTS / f"scale-cpu-{os.cpu_count()}cores{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
