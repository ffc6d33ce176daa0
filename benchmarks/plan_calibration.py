"""Calibrate `lora-tune plan`'s CPU time model on measured runs, and check it on a run it was not fitted on.

plan's time per token is  matmul FLOPs / (peak x efficiency)  +  head share x vocabulary x softmax_ns.  The first
term dominates on real models, the second on a tiny body with a 32k vocabulary, so the two contest shapes pin the two
constants (two equations, two unknowns): lora-tune's median tokens/s in the committed contest results. The fitted
values go into lora_tuner/plan/devices.py (CPU_EFFICIENCY, CPU_SOFTMAX_NS); the check is a separate run, its
tokens/s from its run.json, planned from its own recipe.

    python benchmarks/plan_calibration.py                                    # fit only
    python benchmarks/plan_calibration.py --check adapters/smollm2-135m-alpaca   # fit, then check on that run
"""
import argparse
import json
import os
from argparse import Namespace

from train_throughput import HERE, write_recipe

from lora_tuner import load_recipe
from lora_tuner.plan.devices import CPU_EFFICIENCY, CPU_SOFTMAX_NS
from lora_tuner.plan.estimate import make_plan
from lora_tuner.run_folder import RunFolder

DEVICE = f"cpu-{os.cpu_count()}cores"
TOLERANCE = 0.25


def terms(recipe) -> tuple[float, float]:
    """(matmul FLOPs per token / peak FLOP/s, logits per token): per-token time = a x first / efficiency + second x ns."""
    plan = make_plan(recipe, "cpu")
    vocab = plan.parts.config.get_text_config().vocab_size
    return plan.flops_per_token / (plan.device.tflops(plan.dtype) * 1e12), plan.head_share * vocab


def contest_point(shape: str) -> dict:
    found = json.loads((HERE / "results" / f"train-contest-{DEVICE}-{shape}.json").read_text())
    args = Namespace(shape=shape, rows=found["rows"], warmup=found["warmup"], steps=found["steps"])
    return {"name": f"contest, {shape} shape (lora-tune)", "terms": terms(load_recipe(write_recipe(args, {}))),
            "measured": found["table"]["lora-tune"]["tokens_per_s"]["median"]}


def run_point(folder: str) -> dict:
    run = RunFolder(folder)
    return {"name": f"run {run.path.name}", "terms": terms(run.recipe()),
            "measured": run.manifest().train.tokens_per_s}


def fit(points: list[dict]) -> tuple[float, float]:
    """Solve  1/measured = first / efficiency + second x ns  for the two points."""
    (a1, b1), (a2, b2) = (p["terms"] for p in points)
    y1, y2 = (1 / p["measured"] for p in points)
    det = a1 * b2 - a2 * b1
    inverse_efficiency, seconds_per_logit = (y1 * b2 - y2 * b1) / det, (a1 * y2 - a2 * y1) / det
    return 1 / inverse_efficiency, seconds_per_logit * 1e9


def planned(point: dict, efficiency: float, softmax_ns: float) -> float:
    first, second = point["terms"]
    return 1 / (first / efficiency + second * softmax_ns * 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", help="a finished run folder to check the fitted model on")
    args = parser.parse_args()
    fitted_on = [contest_point("tiny"), contest_point("smollm2")]
    efficiency, softmax_ns = fit(fitted_on)
    print(f"fitted: efficiency {efficiency:.3f}, softmax {softmax_ns:.3f} ns per logit "
          f"(lora_tuner/plan/devices.py has {CPU_EFFICIENCY}, {CPU_SOFTMAX_NS})")
    rows = [dict(p, role="fitted on") for p in fitted_on]
    if args.check:
        rows.append(dict(run_point(args.check), role="checked on"))
    print(f"\n{'run':45s} {'role':10s} {'measured tok/s':>15s} {'planned tok/s':>14s} {'error':>7s}")
    for row in rows:
        # the plan as shipped (the constants in devices.py), which is what users see
        row["planned"] = planned(row, CPU_EFFICIENCY, CPU_SOFTMAX_NS)
        row["error"] = row["planned"] / row["measured"] - 1
        print(f"{row['name']:45s} {row['role']:10s} {row['measured']:15,.0f} {row['planned']:14,.0f} "
              f"{row['error']:+7.1%}")
    checked = [row for row in rows if row["role"] == "checked on"]
    if checked:
        verdict = "within" if abs(checked[0]["error"]) <= TOLERANCE else "NOT within"
        print(f"check: {verdict} {TOLERANCE:.0%}")
    out = HERE / "results" / f"plan-calibration-{DEVICE}.json"
    out.write_text(json.dumps({"device": DEVICE, "fitted": {"efficiency": efficiency, "softmax_ns": softmax_ns},
                               "shipped": {"efficiency": CPU_EFFICIENCY, "softmax_ns": CPU_SOFTMAX_NS},
                               "rows": [{k: v for k, v in row.items() if k != "terms"} for row in rows]},
                              indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
