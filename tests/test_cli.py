"""The CLI shell: bundled recipes validate, fields are documented, overrides apply."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tuner.cli import main
from lora_tuner.config import explain, load_recipe
from lora_tuner.config.schema import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


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
