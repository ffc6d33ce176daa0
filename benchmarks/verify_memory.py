"""Verification's cost: `lora-tune merge` with its default verification on the merge benchmark's 1.1B LLaMA shape,
time and peak RSS, against the same merge with --no-verify. Verification computes the adapter on its base and the
export in float32; it holds one of them at a time.

The base is the merge benchmark's (built once), seen through a folder of links with the export benchmark's LLaMA
tokenizer beside it: verification scores text, so it needs one.

    python benchmarks/verify_memory.py [--repeats 2]
"""
import argparse
import os
import shutil
import statistics
import sys

from export import merged_model, write_result  # builds the base, the adapter and the tokenizer files once
from merge import CACHE, build, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (medians are reported)")
    args = parser.parse_args()
    tokenizer_folder = merged_model()
    base, adapter = build("1b", "1GB")
    linked = CACHE / "1b" / "base-with-tokenizer"
    shutil.rmtree(linked, ignore_errors=True)
    linked.mkdir()
    for path in [*base.iterdir(), *tokenizer_folder.glob("tokenizer*")]:
        (linked / path.name).symlink_to(path.resolve())
    out = CACHE / "1b" / "verify-out"
    command = [sys.executable, "-m", "lora_tuner.cli", "merge", str(adapter), "--base", str(linked), "--out", str(out),
               "--dtype", "fp32"]  # fp32 passes verification on random weights (bf16 agrees on ~97% of near-ties)
    runs = {"merge, verified (the default)": [], "merge --no-verify": []}
    for _ in range(args.repeats):
        for name, extra in (("merge, verified (the default)", []), ("merge --no-verify", ["--no-verify"])):
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            runs[name].append(measure(command + extra))
    shutil.rmtree(out, ignore_errors=True)
    rows = {name: {"seconds": round(statistics.median(s for s, _ in done), 2),
                   "peak_rss_mb": round(statistics.median(r for _, r in done))} for name, done in runs.items()}
    for name, row in rows.items():
        print(f"{name:32s} {row['seconds']:7.2f} s {row['peak_rss_mb']:7d} MB")
    result = {"device": f"cpu-{os.cpu_count()}cores", "model": "LLaMA-shaped 22 x 2048 (1.1B), bf16 base, r=16 adapter",
              "repeats": args.repeats, "methods": rows,
              "before_one_model_at_a_time": "merge verified, measured once at commit 5e73248 (both float32 models "
                                            "held together, bf16 export): 41.96 s, 11,285 MB"}
    write_result("verify-memory", result)


if __name__ == "__main__":
    main()
