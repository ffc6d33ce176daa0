"""The recipes that ship with lora-tune, addressable by name (`lora-tune run demo-tiny-cpu`) as well as by path."""
from importlib.resources import files
from pathlib import Path

from ..errors import fail


def bundled() -> dict[str, Path]:
    """name -> file of every bundled recipe (an installed package's files are plain files on disk)."""
    folder = Path(str(files("lora_tuner.recipes")))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def recipe_file(name_or_path: str) -> Path:
    """A recipe file path as given, or the bundled recipe of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    known = bundled()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in known:
        return known[name]
    raise fail("(file)", "recipe file not found, and no bundled recipe has that name",
               f"check the path, or use one of: {', '.join(known)}", source=name_or_path)
