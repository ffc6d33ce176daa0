"""Read a recipe file, apply --set overrides, and turn every schema problem into one clear line."""
import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import Problem, UserError, about, current, fail, show
from .bundled import recipe_file
from .schema import Recipe

EXPLAIN_HINT = "run 'lora-tune validate --explain' to list every field"
MAX_VALUES = 10_000  # values a recipe may expand to through YAML aliases; real recipes hold a few hundred


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what would otherwise pass silently or blow up: a key given twice in one mapping
    (the second would silently replace the first) and aliases expanding to more values than any recipe holds."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Parse, override and validate a recipe; raise UserError listing every problem at once.

    Args:
        path: a recipe file, or the name of a bundled recipe (`lora-tune recipes` lists them).
        overrides: KEY=VALUE strings as `--set` takes them (values parsed as YAML).

    Example:
        recipe = load_recipe("demo-tiny-cpu", ["train.max_steps=50"])
    """
    path = recipe_file(str(path))
    with about(path):
        raw = _read_yaml(path)
        for override in overrides:
            _apply_override(raw, override)
        try:
            recipe = Recipe.model_validate(raw)
        except ValidationError as exc:
            raise UserError([_problem(raw, error) for error in _one_per_field(exc.errors())]) from None
    recipe._file = str(path)
    return recipe


def _read_yaml(path: Path) -> dict:
    try:
        loader = RecipeLoader(path.read_text(encoding="utf-8"))
        try:
            root = loader.get_single_node()
            _refuse_alias_bombs(root)
            raw = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError:
        raise fail("(file)", "not UTF-8 text", "save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if what.startswith("duplicate key"):
            raise fail(where, what, "give each key once; merge the two sections") from None
        raise fail(where, f"YAML syntax error: {what}", "fix the YAML (indentation, quotes, ':' spacing)") from None
    if not isinstance(raw, dict):
        raise fail("(top level)", f"expected a mapping of sections, got {show(raw)}",
                   "start the file with sections such as 'model:' and 'data:'")
    return raw


def _refuse_alias_bombs(root) -> None:
    """Count the values the document expands to (each alias counted as the whole value it repeats), without
    expanding it: nine nested aliases of nine ("billion laughs") are refused in microseconds, not gigabytes."""
    sizes = {}

    def size(node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 1  # guards against recursive aliases while this node is being counted
            children = node.value if isinstance(node.value, list) else []
            parts = [child for pair in children for child in (pair if isinstance(pair, tuple) else (pair,))]
            sizes[id(node)] = 1 + sum(size(child) for child in parts)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_VALUES:
        raise fail("(file)", f"the YAML expands to {size(root):,} values through aliases (*name)",
                   f"a recipe holds a few hundred; remove the nested aliases (limit {MAX_VALUES:,})")


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise fail(show(override), "expected KEY=VALUE", "write e.g. --set train.learning_rate=1e-4", source="--set")
    try:
        value = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise fail(key, f"{show(text)} is not a YAML value ({what})", "quote it, or write e.g. --set "
                   "train.max_steps=100 or --set lora.target_modules=[q_proj,v_proj]", source="--set") from None
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise fail(key, f"cannot set inside a {type(node).__name__}", "check the key path")
    node[leaf] = value


def _one_per_field(errors: list[dict]) -> list[dict]:
    """Pydantic reports a value that fits no branch of a union (template: 'alpaca' or a pair) once per branch, with
    the branch in the location; users wrote one field, so they get one line: the branch that matches what they wrote
    (not the literal, when they wrote something else)."""
    by_field = {}
    for error in errors:
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part in ("int", "bool"))))
        by_field.setdefault(loc, []).append({**error, "loc": loc})
    kept = []
    for group in by_field.values():
        specific = [e for e in group if not e["type"].startswith("literal_error")]
        kept.append(specific[0] if specific and len(group) > 1 else group[0])
    return kept


def _problem(raw: dict, error: dict) -> Problem:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent_model = _model_at(Recipe, loc[:-1])
        near = difflib.get_close_matches(loc[-1], list(parent_model.model_fields) if parent_model else [], n=1)
        fix = f"did you mean '{'.'.join(loc[:-1] + near)}'?" if near else EXPLAIN_HINT
        return Problem(current(), key, f"unknown key (value {show(error['input'])})", fix)
    if kind == "missing":
        return Problem(current(), key, "required but missing", f"add it; {EXPLAIN_HINT}")
    if kind.startswith("literal_error"):
        return Problem(current(), key, f"{show(error['input'])} is not allowed", f"use one of {_choices(error)}")
    message = error["msg"].removeprefix("Value error, ")
    if not isinstance(error["input"], dict):  # a whole section is too long to quote
        message += f" (got {show(error['input'])})"
    return Problem(current(), key, message, _field_doc(loc))


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
    return _explain(Recipe, "")


def _explain(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        section = _section_type(field.annotation)
        if section is not None and not prefix:  # a top-level section: its fields
            lines += _explain(section, f"{name}.")
            continue
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"{prefix}{name} ({default}): {field.description}")
        if section is not None and type(None) in get_args(field.annotation):  # an optional section (train.dpo)
            lines += _explain_fields(section, f"{prefix}{name}.")
    return lines


def _explain_fields(model: type[BaseModel], prefix: str) -> list[str]:
    return [f"{prefix}{name} (default {field.default!r}): {field.description}" for name, field in model.model_fields.items()]


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in) as YAML, saved in every run folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
