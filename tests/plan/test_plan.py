"""`lora-tune plan`: its arithmetic checked against real tiny models, and it runs offline on the 7B recipes."""

import pytest
from click.testing import CliRunner

from helpers import RECIPES, recipe_dict, write_recipe
from lora_tuner import load_recipe
from lora_tuner.cli import main
from lora_tuner.model.loading import load_base
from lora_tuner.model.lora import attach_lora
from lora_tuner.plan.estimate import make_plan

RECIPES = RECIPES


def weight_bytes(model) -> int:
    """What the loaded weights really occupy, 4-bit quantization constants included."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


@pytest.mark.parametrize("kind", ["llama", "gptj"])
@pytest.mark.parametrize("mode", ["none", "4bit"])
def test_plan_matches_the_real_model(tmp_path, tiny_base, alpaca_file, kind, mode):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(tiny_base(kind), alpaca_file,
                                                            quantization={"mode": mode})))
    plan = make_plan(recipe, "h100")
    base = load_base(recipe.model, recipe.quantization, recipe.model.name_or_path)
    if mode == "none":
        assert plan.params == sum(p.numel() for p in base.parameters())
    model = attach_lora(base, recipe)  # 4-bit: prepare_model_for_kbit_training upcasts the rest to fp32, as planned
    assert plan.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    planned = plan.memory["weights"] + plan.memory["quant consts"]
    actual = weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert abs(planned - actual) / actual < 0.05, (planned, actual)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*7b*.yaml")) + sorted(RECIPES.glob("*6b*.yaml")),
                         ids=lambda p: p.stem)
def test_plan_prints_a_breakdown_for_the_big_recipes_offline(recipe):
    result = CliRunner().invoke(main, ["plan", str(recipe), "--gpu", "a100-40"])
    assert result.exit_code == 0, result.output
    for part in ("parameters", "weights", "quant consts", "LoRA + Adam", "activations", "LM head + loss", "total",
                 "min for"):
        assert part in result.output


def test_plan_counts_llama_7b_like_the_paper():
    plan = make_plan(load_recipe(RECIPES / "llama-7b-qlora-alpaca.yaml"), "h100")
    assert plan.params == 6_738_415_616  # LLaMA-7B's published parameter count
    assert plan.fits and plan.total_bytes <= 10 * 2**30, plan.lines()  # the QLoRA recipe's promise: 10 GB


def test_gpus_without_bf16_plan_fp16_or_refuse_bf16():
    t4 = make_plan(load_recipe(RECIPES / "llama-7b-qlora-alpaca.yaml"), "t4")
    assert t4.dtype == "float16" and t4.fits  # the recipe's header promises a T4
    result = CliRunner().invoke(main, ["plan", "llama-7b-qlora-alpaca", "--device", "t4", "--set",
                                       "model.dtype=bfloat16"])
    assert result.exit_code == 2 and "model.dtype" in result.output and "float16" in result.output


def test_a_recipe_that_does_not_fit_says_what_would_and_exits_1():
    result = CliRunner().invoke(main, ["plan", "llama-7b-lora-alpaca", "--device", "t4", "--set",
                                       "train.gradient_checkpointing=false"])
    assert result.exit_code == 1, result.output
    assert "does NOT fit" in result.output and "GiB usable" in result.output
    suggestion = next(line for line in result.output.splitlines() if line.startswith("to fit"))
    assert "quantization.mode: 4bit" in suggestion or "GPUs" in suggestion, suggestion
    # and the suggestion, applied, does fit
    fixed = make_plan(load_recipe(RECIPES / "llama-7b-lora-alpaca.yaml", ["quantization.mode=4bit"]), "t4")
    assert "quantization.mode: 4bit" not in suggestion or fixed.fits


def test_plan_accounts_for_world_size():
    recipe = load_recipe(RECIPES / "llama-7b-lora-alpaca.yaml",
                         ["distributed.strategy=fsdp", "train.gradient_checkpointing=true"])
    one, four = make_plan(recipe, "a100-40"), make_plan(recipe, "a100-40", world_size=4)
    assert four.memory["weights"] == one.memory["weights"] // 4
    assert four.memory["activations"] == one.memory["activations"]  # each GPU still holds its own batch
    assert four.seconds < one.seconds / 3.9
    ddp = make_plan(load_recipe(RECIPES / "llama-7b-lora-alpaca.yaml"), "a100-40", world_size=4)
    assert ddp.memory["weights"] == one.memory["weights"]


def test_auto_batch_is_the_largest_that_fits():
    recipe = load_recipe(RECIPES / "llama-7b-lora-alpaca.yaml",
                         ["train.batch_size=auto", "train.gradient_checkpointing=auto"])
    for gpu in ("a100-80", "a100-40", "rtx4090"):
        plan = make_plan(recipe, gpu)
        assert plan.fits, (gpu, plan.lines())
        bigger = load_recipe(RECIPES / "llama-7b-lora-alpaca.yaml", [
            f"train.batch_size={plan.batch_size * 2}", f"train.gradient_checkpointing={plan.checkpointing}"])
        assert plan.batch_size == 64 or not make_plan(bigger, gpu).fits
    roomy, tight = make_plan(recipe, "a100-80"), make_plan(recipe, "rtx4090")
    assert not roomy.checkpointing and roomy.batch_size >= 4  # room to spare: no recomputation
    assert tight.checkpointing  # 16-bit 7B on 24 GB: only with checkpointing


@pytest.mark.parametrize("name", ["huggyllama/llama-7b", "EleutherAI/gpt-j-6b"])
def test_the_known_bases_linear_names_are_the_ones_transformers_builds(name):
    """validate checks a bundled recipe's lora.target_modules against this table without building the model."""
    from transformers import AutoConfig

    from lora_tuner.model.anatomy import meta_model
    from lora_tuner.plan.known_configs import KNOWN, KNOWN_LINEARS
    from lora_tuner.preflight import linear_names

    assert set(KNOWN_LINEARS[name]) == linear_names(meta_model(AutoConfig.for_model(**KNOWN[name])))
