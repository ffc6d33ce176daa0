"""Adapters by name: the folder an adapter is given as, and the name it is served and switched to by. Whether an
adapter is acceptable and fits a base is decided in weights/adapter.py (and model/lora.py for a loaded base)."""
import re
from pathlib import Path

from ..errors import fail

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder, resolved; a path that cannot be (a loop of symbolic links) is one line."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # Python raises RuntimeError for a symlink loop
        raise fail("adapter", f"cannot resolve the path ({exc})", "point at a real adapter folder", source=str(path)) from None


def adapter_name(folder: str | Path) -> str:
    """The name an adapter folder is served or switched to by: its folder name as an identifier."""
    return re.sub(r"\W", "_", adapter_folder(folder).name)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name == "__base__":  # peft reserves __base__ for "no adapter" rows
        raise fail("name", f"{name!r} is not a plain identifier",
                   "use letters, digits and '_', e.g. support_v2", source="adapter")
    return name
