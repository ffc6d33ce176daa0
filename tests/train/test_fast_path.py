"""The fast path changes speed, not results: the response loss has the model's own loss and gradients, and a fast
run reaches the held-out loss of a plain fp32 run."""

import pytest
import torch
from click.testing import CliRunner

from helpers import make_trainer, recipe_dict, write_recipe
from lora_tuner import load_recipe
from lora_tuner.cli import main
from lora_tuner.data.prepare import prepare_data
from lora_tuner.model.loading import load_base
from lora_tuner.model.lora import attach_lora
from lora_tuner.model.tokenizer import load_tokenizer
from lora_tuner.run_folder import RunFolder


def test_response_loss_has_the_models_loss_and_gradients(tmp_path, tiny_base, alpaca_file):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(tiny_base("llama"), alpaca_file,
                                                            lora={"dropout": 0.0}, data={"validation_size": 0})))
    tokenizer = load_tokenizer(recipe.model)
    model = attach_lora(load_base(recipe.model, recipe.quantization, recipe.model.name_or_path), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepare_data(recipe, tokenizer), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainable = [p for p in model.parameters() if p.requires_grad]

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    own, own_grads = gradients(model(**batch).loss)
    trainer.compute_loss(model, dict(batch))  # decides on the first batch
    assert trainer.response_loss, trainer.fast_path_notes()
    ours, our_grads = gradients(trainer.compute_loss(model, batch))
    assert torch.allclose(own, ours, rtol=1e-6), (own, ours)
    for a, b in zip(own_grads, our_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
    assert any(g.abs().max() > 0 for g in our_grads)


@pytest.mark.slow
def test_fast_path_reaches_the_held_out_loss_of_a_plain_fp32_run(tmp_path):
    """The demo recipe with every fast-path switch on (bf16 where the CPU has it, response loss, packed SDPA,
    lora-tune's LoRA layer) against the same recipe in fp32 with the model's own loss, transformers' SDPA and peft's
    layer: within 2% of held-out loss."""
    common = ["--set", "train.max_steps=100", "--set", "train.save_steps=1000", "--set", "train.eval_steps=1000"]
    plain = ["--set", "model.dtype=float32", "--set", "train.response_loss=false",
             "--set", "model.attn_implementation=sdpa", "--set", "train.fused_lora=false"]
    fast = ["--set", "model.dtype=auto"]
    for name, extra in (("fast", fast), ("plain", plain)):
        result = CliRunner().invoke(main, ["run", "demo-tiny-cpu", "--output", str(tmp_path / name), *common, *extra])
        assert result.exit_code == 0, result.output[-3000:]
    fast_run, plain_run = (RunFolder(tmp_path / name).manifest() for name in ("fast", "plain"))
    print("fast path:", fast_run.fast_path, fast_run.loss.eval_start, "->", fast_run.loss.eval, "plain:", plain_run.loss.eval)
    assert any("response loss on" in note for note in fast_run.fast_path)
    assert any("response loss off" in note for note in plain_run.fast_path)
    assert "fused LoRA layers on (auto: 16-bit base)" in fast_run.fast_path
    assert "fused LoRA layers off (recipe)" in plain_run.fast_path
    assert fast_run.loss.eval < 0.6 * fast_run.loss.eval_start  # both really trained
    assert abs(fast_run.loss.eval - plain_run.loss.eval) / plain_run.loss.eval < 0.02
