"""GGUF export benchmark: `lora-tune export --format gguf` against the read+write floor, on a 1.1B LLaMA shape.

Builds once (cached in benchmarks/.cache/export) what a user exports: the merge benchmark's random 1.1B base and r=16
adapter merged by `lora-tune merge` (its default, fp16), with the LLaMA SentencePiece tokenizer from ../shared saved
beside it the way a run saves it. Then, per GGUF type, each in its own process with its peak RSS read, taking turns
--repeats times, each after a `sync`:
- `lora-tune export --no-verify`;
- the read+write floor: a Python process without torch that reads every byte of the merged weights and writes as many
  bytes as that type's GGUF has. No exporter does less I/O.
`python -c "import torch, transformers, gguf"` is timed too (what any exporter built on them starts with), and the f16
export once with verification on (the default). Quantized types are not verified on the random 1.1B: on random
weights every logit is near-equal, so top-1 agreement says nothing. Their quality is measured on real weights instead:
SmolLM2-135M (../shared, imported from its GGUF) exported in every type, each verified by llama.cpp against the model in
float32 on 16 held-out Alpaca rows; beside each, the same type made by llama.cpp's own quantizer (llama-quantize, its
C code through llama-cpp-python) from lora-tune's f16 export, as a llama.cpp user makes it, judged the same way.

    python benchmarks/export.py [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--repeats 3]
    python benchmarks/export.py --smollm2-only --types bf16,q5_k,q4_k      # SmolLM2 in llama.cpp only
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

from merge import MODELS, build, machine, measure  # the same random 1.1B base and adapter, timed the same way

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "export"
RESULTS = HERE / "results"
SHARED = HERE.parents[1] / "shared"
TOKENIZER = SHARED / "tokenizers" / "llama"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = 16
FLOOR = """
import sys
size, out, sources = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
chunk = memoryview(bytearray(64 << 20))
written = 0
with open(out, "wb") as sink:
    for source in sources:
        with open(source, "rb", buffering=0) as f:
            while n := f.readinto(chunk):
                take = min(n, size - written)
                written += sink.write(chunk[:take])
    while written < size:
        written += sink.write(chunk[:min(len(chunk), size - written)])
"""
IMPORTS = "import torch, transformers, gguf"
LLAMA_QUANTIZE = ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")  # the --types llama-quantize makes under the same name
LLAMA_QUANTIZE_CHILD = "import sys; from lora_tuner.verify.llama_cpp import quantize; quantize(*sys.argv[1:])"


def merged_model() -> Path:
    """The export's source, built once: a `lora-tune merge` of the random base and adapter, with a real tokenizer."""
    folder = CACHE / "merged-1b"
    if not (folder / "tokenizer.json").is_file():
        if not (TOKENIZER / "tokenizer.model").is_file():
            raise SystemExit(f"needs the LLaMA tokenizer at {TOKENIZER} (../shared beside the checkout)")
        base, adapter = build("1b", "1GB")
        shutil.rmtree(folder, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "lora_tuner.cli", "merge", str(adapter), "--base", str(base),
                        "--out", str(folder), "--no-verify"], check=True)
        from transformers import LlamaTokenizer

        LlamaTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


def smollm2_agreement(kinds: list[str]) -> dict:
    """Per type: top-1 agreement and KL of the SmolLM2 export with the model in float32, as its verification reports
    them (llama.cpp the judge when its binding is installed), on the last HELD_OUT Alpaca rows of ../shared."""
    from lora_tuner.formats.registry import FORMATS
    from lora_tuner.formats.templates import resolve
    from lora_tuner.export.gguf.export import verify_file
    from lora_tuner.model.gguf_import import import_gguf
    from lora_tuner.verify import llama_cpp

    folder = CACHE / "smollm2"
    if not (folder / "config.json").is_file():
        import_gguf(SMOLLM2, folder)
    rows = json.loads((SHARED / "data" / "alpaca_5000.json").read_text())[-HELD_OUT:]
    with (folder / "validation.jsonl").open("w") as out:  # as a run folder keeps its held-out rows
        for row in rows:
            out.write(json.dumps({**FORMATS["alpaca"].to_example(row, resolve("alpaca")), "held_out": True}) + "\n")
    found = {}
    f16 = CACHE / "smollm2-source-f16.gguf"  # what llama-quantize starts from
    compared = [kind for kind in kinds if kind in LLAMA_QUANTIZE] if llama_cpp.version() else []
    if compared:
        subprocess.run(export_command(folder, "f16", f16, False) + ["--force"], check=True, capture_output=True)
    for kind in kinds:
        gguf = CACHE / f"smollm2-{kind}.gguf"
        subprocess.run(export_command(folder, kind, gguf, True) + ["--force"], capture_output=True)  # 2: below min
        report = json.loads(gguf.with_suffix(".export_report.json").read_text())
        v = report["verification"]
        found[kind] = {"top1_agreement": round(v["top1_agreement"], 4), "mean_kl": round(v["mean_kl"], 5),
                       "min_top1": v["min_top1"], "passed": v["passed"], "tokens": v["tokens"], "judge": v["judge"],
                       "gguf_mb": round(report["bytes"] / 2**20, 1)}
        if kind in compared:
            started = time.perf_counter()
            llama_cpp.quantize(f16, gguf, kind)
            seconds = time.perf_counter() - started
            theirs = verify_file(gguf, folder, kind, HELD_OUT)
            found[kind]["llama_quantize"] = {"top1_agreement": round(theirs.top1_agreement, 4),
                                             "mean_kl": round(theirs.mean_kl, 5), "seconds": round(seconds, 2)}
        print(f"SmolLM2 {kind}: {found[kind]}", flush=True)
        clean(gguf)
    clean(f16)
    return found


def has_llama_cpp() -> bool:
    """llama-cpp-python installed (asked in a child: importing it here would weigh on every measured child's RSS)."""
    return subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def export_command(source: Path, kind: str, out: Path, verify: bool) -> list[str]:
    return [sys.executable, "-m", "lora_tuner.cli", "export", str(source), "--type", kind, "--out", str(out),
            *([] if verify else ["--no-verify"])]


def clean(out: Path) -> None:
    for path in out.parent.glob(f"{out.stem}.*"):
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0",
                        help="GGUF types to export, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (medians are reported)")
    parser.add_argument("--smollm2-only", action="store_true", help="only the SmolLM2 part, for --types "
                        "(results/export-smollm2-cpu-Ncores.json)")
    args = parser.parse_args()
    if args.smollm2_only:
        found = {"device": f"cpu-{os.cpu_count()}cores", "cpu": machine(),
                 "smollm2_verified": smollm2_agreement(args.types.split(","))}
        path = RESULTS / f"export-smollm2-cpu-{os.cpu_count()}cores.json"
        path.write_text(json.dumps(found, indent=2) + "\n")
        print(f"wrote {path}")
        return
    source = merged_model()
    shards = sorted(source.glob("*.safetensors"))
    source_mb = sum(p.stat().st_size for p in shards) / 2**20
    out = CACHE / "out.gguf"
    measure(["cat", *map(str, shards)])  # warm the page cache so every method reads from memory

    kinds = args.types.split(",")
    f16 = CACHE / "source-f16.gguf"  # llama-quantize's input, as a llama.cpp user makes a k-quant
    quantized_by_llama_cpp = [kind for kind in kinds if kind in LLAMA_QUANTIZE] if has_llama_cpp() else []
    if quantized_by_llama_cpp:
        clean(f16)
        subprocess.run(export_command(source, "f16", f16, False), check=True, capture_output=True)
    runs: dict[str, list[tuple[float, float]]] = {"python + torch, transformers, gguf imports": []}
    sizes, in_process = {}, {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        runs["python + torch, transformers, gguf imports"].append(measure([sys.executable, "-c", IMPORTS]))
        for kind in kinds:
            clean(out)
            os.sync()
            runs.setdefault(f"lora-tune export {kind}", []).append(measure(export_command(source, kind, out, False)))
            sizes[kind] = out.stat().st_size
            in_process[kind].append(json.loads(out.with_suffix(".export_report.json").read_text())["seconds"])
            clean(out)
            os.sync()
            floor = [sys.executable, "-c", FLOOR, str(sizes[kind]), str(out), *map(str, shards)]
            runs.setdefault(f"read+write floor {kind}", []).append(measure(floor))
            if kind in quantized_by_llama_cpp:
                clean(out)
                os.sync()
                runs.setdefault(f"llama.cpp llama-quantize {kind} (from the f16 GGUF)", []).append(
                    measure([sys.executable, "-c", LLAMA_QUANTIZE_CHILD, str(f16), str(out), kind]))
    clean(out)
    clean(f16)
    os.sync()
    verified = measure(export_command(source, "f16", out, True))
    verification = json.loads(out.with_suffix(".export_report.json").read_text())["verification"]
    clean(out)

    rows = {name: {"seconds": round(statistics.median(s for s, _ in done), 2),
                   "min_max_seconds": [round(min(s for s, _ in done), 2), round(max(s for s, _ in done), 2)],
                   "peak_rss_mb": round(statistics.median(r for _, r in done))} for name, done in runs.items()}
    rows["lora-tune export f16, verified (the default)"] = {"seconds": round(verified[0], 2),
                                                            "peak_rss_mb": round(verified[1])}
    print(f"{'method':54s} {'median s':>9s} {'min-max s':>13s} {'peak RSS MB':>12s}")
    for name, row in rows.items():
        spread = "-".join(f"{s:.1f}" for s in row.get("min_max_seconds", []))
        print(f"{name:54s} {row['seconds']:9.2f} {spread:>13s} {row['peak_rss_mb']:12d}")

    by_type = {}
    for kind in kinds:
        ours, floor = rows[f"lora-tune export {kind}"], rows[f"read+write floor {kind}"]
        by_type[kind] = {"gguf_mb": round(sizes[kind] / 2**20),
                         "time_vs_floor": round(ours["seconds"] / floor["seconds"], 2),
                         "in_process_seconds": round(statistics.median(in_process[kind]), 2),
                         "rss_mb": ours["peak_rss_mb"]}
        if "q8_0" in kinds:  # the k-quant issue's yardstick: within 3x of q8_0's time
            by_type[kind]["time_vs_q8_0"] = round(ours["seconds"] / rows["lora-tune export q8_0"]["seconds"], 2)
        theirs = rows.get(f"llama.cpp llama-quantize {kind} (from the f16 GGUF)")
        if theirs:  # what a llama.cpp user adds to an f16 export
            by_type[kind]["llama_quantize_seconds"] = theirs["seconds"]
        print(f"{kind}: {by_type[kind]}")
    result = {
        "device": f"cpu-{os.cpu_count()}cores", "cpu": machine(), "platform": platform.platform(),
        "model": f"LLaMA-shaped {MODELS['1b']['num_hidden_layers']} layers x {MODELS['1b']['hidden_size']}, merged "
                 f"fp16, {source_mb:.0f} MB, LLaMA SentencePiece vocabulary",
        "repeats": args.repeats, "methods": rows, "by_type": by_type,
        "verification_f16": {k: verification[k] for k in ("rows", "tokens", "top1_agreement", "passed")},
        "smollm2_verified": smollm2_agreement(kinds) if SMOLLM2.is_file() else "../shared is not here",
    }
    write_result("export", result)


def write_result(kind: str, result: dict) -> None:
    """results/KIND-cpu-Ncores-1b.json: the device in the name, as every benchmark here writes it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{kind}-cpu-{os.cpu_count()}cores-1b.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
