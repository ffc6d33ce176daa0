"""Read raw rows from a local file, the hub, or the built-in demo generator."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import fail
from .demo_tasks import demo_preferences, demo_tasks

BUILTIN = {"builtin:demo-tasks": demo_tasks, "builtin:demo-preferences": demo_preferences}  # generated offline
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass
class RawRows:
    rows: list  # one entry per source row, in file order; not yet checked
    sha256: str  # of the file bytes (or of the generated rows), recorded in run.json


def is_local(path: str) -> bool:
    return path in BUILTIN or path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def read_rows(path: str, limit: int | None) -> RawRows:
    if path in BUILTIN:
        rows = BUILTIN[path](limit or 2000)
        return RawRows(rows, _sha256(json.dumps(rows).encode()))
    if is_local(path):
        raw = _read_local(Path(path).expanduser())
    else:
        raw = _read_hub(path)
    return RawRows(raw.rows[:limit] if limit else raw.rows, raw.sha256)


def _read_local(path: Path) -> RawRows:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise fail("data.path", f"data file {str(path)!r} {what}", "check the path (relative to where you run)")
    if path.suffix not in LOCAL_SUFFIXES:
        raise fail("data.path", f"unsupported file type {path.suffix!r}", f"use one of {', '.join(LOCAL_SUFFIXES)}")
    blob = path.read_bytes()
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return RawRows(pyarrow.parquet.read_table(path).to_pylist(), _sha256(blob))
        except pyarrow.ArrowException as exc:
            raise fail("data.path", f"{str(path)!r} is not a readable parquet file ({str(exc)[:80]})",
                       "re-save it, or use .json / .jsonl") from None
    # JSON is parsed here rather than by datasets: Arrow coerces or rejects mixed-type rows, and we must
    # report exactly which rows are bad.
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail("data.path", f"{str(path)!r} is not UTF-8 (byte {exc.start})", "re-save the file as UTF-8") from None
    rows = _parse_jsonl(text, path) if path.suffix == ".jsonl" else _parse_json(text, path)
    return RawRows(rows, _sha256(blob))


def _parse_json(text: str, path: Path) -> list:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail("data.path", f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})",
                   "fix the file, or use .jsonl with one object per line") from None
    except RecursionError:
        raise fail("data.path", f"{str(path)!r} nests lists or objects too deeply to read",
                   "write the rows as a flat JSON list of objects") from None
    if not isinstance(rows, list):
        raise fail("data.path", f"{str(path)!r} holds a JSON {type(rows).__name__}, not a list of rows",
                   "write the rows as a JSON list of objects")
    return rows


def _parse_jsonl(text: str, path: Path) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise fail("data.path", f"{str(path)!r} line {number} is not valid JSON ({exc.msg})",
                       "fix that line; each line must be one JSON object") from None
        except RecursionError:
            raise fail("data.path", f"{str(path)!r} line {number} nests lists or objects too deeply to "
                       "read", "fix that line; each line must be one flat JSON object") from None
    return rows


def _read_hub(name: str) -> RawRows:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # datasets raises many types for "not found"/"offline"; all mean the same to the user
        raise fail("data.path", f"cannot load hub data set {name!r} ({type(exc).__name__})",
                   "check the id and your network, or point data.path at a local .json/.jsonl/.parquet file") from None
    return RawRows(dataset.to_list(), dataset._fingerprint)


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
