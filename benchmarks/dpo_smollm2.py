"""SFT -> DPO on the real SmolLM2-135M-Instruct (../shared), the usual pipeline, end to end with lora-tune's commands:

1. SFT: the first 2,000 shared Alpaca rows, `--sft-steps` steps (recipe as smollm2-135m-alpaca's);
2. DPO from that adapter (init.adapter, reference: the SFT adapter as it started) on 600 other Alpaca rows (2,000 to
   2,600, never seen by the SFT run) made into pairs by a written-down rule (data.format alpaca-cut): chosen is the
   reference answer, rejected the same answer cut after half its words;
3. `lora-tune eval` on the DPO run's 100 held-out pairs: preference accuracy, reward margin and the response loss on
   the chosen answers, for the base, the SFT start and the DPO result.

Targets (issue 25): accuracy up >= 20 points over the SFT start in <= 60 DPO steps, with the chosen answers' loss no
more than 5% worse. A mechanical check that preference tuning works, not a claim about helpfulness.

    python benchmarks/dpo_smollm2.py                 # ~10 minutes on 2 CPU cores; JSON in benchmarks/results/
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from train_throughput import SHARED, base_folder  # noqa: E402

from lora_tuner import load_recipe, run  # noqa: E402
from lora_tuner.eval.evaluate import evaluate  # noqa: E402
from lora_tuner.run_folder import RunFolder  # noqa: E402
from lora_tuner.train.manifest import device  # noqa: E402

ALPACA = SHARED / "data/alpaca_5000.json"


def recipe(folder: Path, base: Path, rows_file: Path, name: str, **sections) -> object:
    raw = {
        "model": {"name_or_path": str(base), "dtype": "auto"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(rows_file), "max_length": 256, "validation_size": 100},
        "train": {"batch_size": 4, "warmup": 0.05, "logging_steps": 5, "eval_steps": 1000, "save_steps": 1000,
                  "report_to": []},
        "output": {"name": name, "root": str(folder)},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    rows = json.loads(ALPACA.read_text())
    base = base_folder("smollm2")
    cache = HERE / ".cache" / "dpo"  # the SFT run is kept: reruns of the DPO half start from the same adapter
    cache.mkdir(parents=True, exist_ok=True)
    sft_folder = cache / f"sft-{args.sft_steps}"
    (cache / "sft.json").write_text(json.dumps(rows[:2000]))
    if not RunFolder(sft_folder).is_run:
        sft_recipe = recipe(cache, base, cache / "sft.json", "sft", train={"max_steps": args.sft_steps,
                                                                           "learning_rate": 2e-4})
        run(sft_recipe, output=str(sft_folder))
    sft = RunFolder(sft_folder).manifest()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "pairs.json").write_text(json.dumps(rows[2000:2600]))
        dpo_recipe = recipe(tmp, base, tmp / "pairs.json", "dpo", init={"adapter": str(sft_folder)},
                            data={"format": "alpaca-cut"},
                            train={"method": "dpo", "dpo": {"beta": args.beta}, "max_steps": args.dpo_steps,
                                   "learning_rate": args.learning_rate})
        started = time.perf_counter()
        dpo = run(dpo_recipe)
        dpo_seconds = time.perf_counter() - started
        report = evaluate(dpo.folder)
    print(report.table())
    models = {m.name: m for m in report.models}
    start, result = models["start (init.adapter)"], models["base + adapter"]
    found = {
        "machine": device(),
        "sft": {"steps": args.sft_steps, "seconds": round(sft.train.runtime_s, 1),
                "held_out_loss": [sft.loss.eval_start, sft.loss.eval]},
        "dpo": {"steps": args.dpo_steps, "seconds": round(dpo_seconds, 1), "beta": args.beta,
                "learning_rate": args.learning_rate, "tokens_per_s": dpo.manifest.train.tokens_per_s,
                "fast_path": dpo.manifest.fast_path},
        "eval": {"pairs": report.pairs, "reference": report.reference,
                 "models": [{"name": m.name, "chosen_loss": m.loss, "preference_accuracy": m.preference_accuracy,
                             "reward_margin": m.reward_margin} for m in report.models]},
        "accuracy_gain_points": round(100 * (result.preference_accuracy - start.preference_accuracy), 1),
        "chosen_loss_change": round(result.loss / start.loss - 1, 4),
    }
    found["targets_met"] = found["accuracy_gain_points"] >= 20 and found["chosen_loss_change"] <= 0.05
    print(f"accuracy +{found['accuracy_gain_points']} points, chosen loss {found['chosen_loss_change']:+.1%}, "
          f"targets met: {found['targets_met']}")
    out = HERE / "results" / "dpo-smollm2-cpu-2cores.json"
    out.write_text(json.dumps(found, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
