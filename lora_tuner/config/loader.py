"""Read a recipe file, apply --set overrides, and turn every schema problem into one clear line."""
import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import Problem, UserError, fail, show
from .schema import Recipe

EXPLAIN_HINT = "run 'lora-tune validate --explain' to list every field"


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Parse, override and validate a recipe; raise UserError listing every problem at once."""
    source = str(path)
    raw = _read_yaml(Path(path))
    for override in overrides:
        _apply_override(raw, override, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError([_problem(source, raw, error) for error in exc.errors()]) from None


def _read_yaml(path: Path) -> dict:
    source = str(path)
    if not path.is_file():
        raise fail(source, "(file)", "recipe file not found", "check the path, or run 'lora-tune recipes' for bundled ones")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise fail(source, "(file)", "not UTF-8 text", "save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise fail(source, where, f"YAML syntax error: {what}", "fix the YAML (indentation, quotes, ':' spacing)") from None
    if not isinstance(raw, dict):
        raise fail(source, "(top level)", f"expected a mapping of sections, got {show(raw)}",
                   "start the file with sections such as 'model:' and 'data:'")
    return raw


def _apply_override(raw: dict, override: str, source: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise fail("--set", show(override), "expected KEY=VALUE", "write e.g. --set train.learning_rate=1e-4")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise fail(source, key, f"cannot set inside a {type(node).__name__}", "check the key path")
    node[leaf] = yaml.safe_load(text)


def _problem(source: str, raw: dict, error: dict) -> Problem:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent_model = _model_at(Recipe, loc[:-1])
        near = difflib.get_close_matches(loc[-1], list(parent_model.model_fields) if parent_model else [], n=1)
        fix = f"did you mean '{'.'.join(loc[:-1] + near)}'?" if near else EXPLAIN_HINT
        return Problem(source, key, f"unknown key (value {show(error['input'])})", fix)
    if kind == "missing":
        return Problem(source, key, "required but missing", f"add it; {EXPLAIN_HINT}")
    if kind.startswith("literal_error"):
        return Problem(source, key, f"{show(error['input'])} is not allowed", f"use one of {_choices(error)}")
    message = error["msg"].removeprefix("Value error, ")
    if not isinstance(error["input"], dict):  # a whole section is too long to quote
        message += f" (got {show(error['input'])})"
    return Problem(source, key, message, _field_doc(loc))


def _field_doc(loc: list[str]) -> str:
    """The field's one-line doc is the best hint at what a valid value looks like."""
    section = _model_at(Recipe, loc[:-1])
    field = section.model_fields.get(loc[-1]) if section and loc else None
    return f"{'.'.join(loc)} is: {field.description}" if field and field.description else EXPLAIN_HINT


def _choices(error: dict) -> str:
    return error.get("ctx", {}).get("expected", "the listed values")


def _model_at(model: type[BaseModel] | None, loc: list[str]) -> type[BaseModel] | None:
    """The section model at a key path, so did-you-mean suggests keys of the right section."""
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _section_type(model.model_fields[part].annotation)
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def explain() -> list[str]:
    """One line per recipe field: key, type, default and its doc."""
    lines = []
    for section_name, section_field in Recipe.model_fields.items():
        section = _section_type(section_field.annotation)
        for name, field in section.model_fields.items():
            default = "required" if field.is_required() else f"default {field.default!r}"
            lines.append(f"{section_name}.{name} ({default}): {field.description}")
    return lines


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in) as YAML, saved in every run folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
