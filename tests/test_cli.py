"""The CLI shell: bundled recipes validate, fields are documented, overrides apply."""

import pytest
from click.testing import CliRunner

from helpers import RECIPES
from lora_tuner.cli import main
from lora_tuner.config import explain, load_recipe
from lora_tuner.config.schema import Recipe

RECIPES = sorted((RECIPES).glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_bundled_recipe_validates(recipe):
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"ok: {recipe}" in result.output
    assert recipe.read_text().startswith("# ") and "lora-tune run" in recipe.read_text().splitlines()[1]


def test_recipes_lists_the_bundled_ones():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == [p.stem for p in RECIPES]


def test_explain_documents_every_field():
    lines = explain()
    documented = {line.split(" ")[0] for line in lines}
    for section, field in Recipe.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"{section}.{name}" in documented
    assert all(not line.endswith("None") for line in lines)
    result = CliRunner().invoke(main, ["validate", "--explain"])
    assert result.exit_code == 0 and "lora.rank (default 16): LoRA rank r." in result.output


def test_set_overrides_fields_with_typed_values():
    recipe = load_recipe(RECIPES[0], ["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                      "data.packing=false"])
    assert recipe.train.learning_rate == 1e-4
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.packing is False


def test_validate_never_reaches_for_the_network(monkeypatch):
    """A hub model not in the cache is a note, not a download: offline, huggingface_hub would retry for ~25 s."""
    import socket

    looked_up = []

    def no_network(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    recipe = next(p for p in RECIPES if p.stem == "smollm2-135m-alpaca")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "is not on this machine" in result.output and looked_up == []


HUB_BASE = "model: {name_or_path: huggyllama/llama-7b}\noutput: {name: r}\n"


@pytest.mark.parametrize("recipe_text,code,message", [
    (HUB_BASE + "data: {path: tatsu-lab/alpaca}\n", 0, "ok: "),
    (HUB_BASE + "data: {path: tatsu-lab/alpaca, max_length: 9000}\n", 2,
     "data.max_length: 9000 is longer than the model's 2048 positions"),
    (HUB_BASE + "data: {path: tatsu-lab/alpaca}\nlora: {rnak: 4}\n", 2, "lora.rnak: unknown key"),
    (HUB_BASE + "data: {path: tatsu-lab/alpaca}\nlora: {target_modules: [q_proj, v_prj]}\n", 2,
     "lora.target_modules: ['v_prj'] name no linear layer of huggyllama/llama-7b"),
    (HUB_BASE + "data: {path: tatsu-lab/alpaca}\nlora: {target_modules: [q_proj, v_proj]}\n", 0, "ok: "),
], ids=["hub-recipe-ok", "too-long-for-the-hub-base", "schema-error", "mistyped-target", "target-list-ok"])
def test_validate_of_a_hub_recipe_imports_neither_torch_nor_transformers(tmp_path, recipe_text, code, message):
    """Importing them costs ~3 s; a recipe whose model, tokenizer and data are on the hub needs neither to be checked,
    and the torch-free path still catches a length the known base cannot hold."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    probe = ("import sys\nfrom lora_tuner.cli import main\ntry:\n    main(['validate', sys.argv[1]])\n"
             "except SystemExit as exit:\n    print('exit', exit.code, sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == f"exit {code} []", (done.stdout, done.stderr)
    assert message in done.stdout + done.stderr
