"""Recipes: the typed schema and the YAML loader."""
from .loader import dump_recipe, explain, load_recipe
from .schema import Recipe

__all__ = ["Recipe", "dump_recipe", "explain", "load_recipe"]
