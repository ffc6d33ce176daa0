"""The one output guard (lora_tuner/outputs.py), held from outside:

- every command is known here as one that writes or one that only reads, so a new command fails this file until it is
  placed, and every writer is run once with an audit hook that sees each file it opens for writing, creates, moves or
  removes: all of them must lie under a path the guard granted;
- every writer, pointed at each of its inputs (the output being the input, inside it or holding it), with and
  without --force, refuses in one line and leaves every input byte-identical."""
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import random_adapter, recipe_dict, write_recipe
from lora_tuner.cli import main
from lora_tuner.outputs import AUDIT_EVENT

READERS = {"validate", "recipes", "plan", "generate", "chat", "serve", "ui"}
WRITERS = {"run", "merge", "export", "import-gguf", "eval"}
WRITE_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.symlink", "os.link",
                "os.chmod"}
LIBRARY_CACHES = [Path.home() / ".cache", Path.home() / ".config"]  # matplotlib's font cache and the like


class Audit:
    """What one command granted and wrote, from Python's audit events (sys.addaudithook cannot be removed, so one
    hook serves the whole session and records only while a command runs)."""
    current = None

    def __init__(self):
        self.grants, self.writes = [], []

    @classmethod
    def hook(cls, event, args):
        audit = cls.current
        if audit is None:
            return
        if event == AUDIT_EVENT:
            audit.grants.append(Path(args[0]))
        elif event == "open" and _writes(args[1], args[2]) and isinstance(args[0], (str, bytes, os.PathLike)):
            if not os.path.isdir(args[0]):  # a folder opened to write: a nameless temporary file (O_TMPFILE)
                audit.writes.append(("open", os.fsdecode(args[0])))
        elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
            audit.writes.append((event, os.fsdecode(args[1])))
            if event != "shutil.copyfile":
                audit.writes.append((event, os.fsdecode(args[0])))
        elif event in WRITE_EVENTS and not (event in ("os.remove", "os.rmdir") and args[-1] is not None):
            audit.writes.append((event, os.fsdecode(args[0])))  # removals inside an rmtree carry a dir_fd: covered

    def ungranted(self) -> list:
        allowed = self.grants + LIBRARY_CACHES + [Path("/dev")]
        return sorted({(event, path) for event, path in self.writes
                       if not any(Path(path).absolute().is_relative_to(root) for root in allowed)})


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) if isinstance(flags, int) else False


sys.addaudithook(Audit.hook)


def invoke(args: list[str]):
    """The command in this process, its writes recorded."""
    Audit.current = audit = Audit()
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        Audit.current = None
    return result, audit


def test_every_command_is_known_as_a_writer_or_a_reader():
    assert set(main.commands) == WRITERS | READERS, "place a new command in WRITERS (and test it below) or READERS"


@dataclass
class Made:
    """What the writers read, made once: a trained run, an adapter on a BPE base, its merged model and GGUF."""
    tmp: Path
    data: Path
    base: Path  # tiny LLaMA, byte tokenizer
    run: Path  # trained on base
    bpe_base: Path
    adapter: Path  # a PEFT adapter on bpe_base
    base_gguf: Path  # bpe_base as f16 GGUF


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_base, tiny_bpe_llama, alpaca_file) -> Made:
    from lora_tuner.export.gguf.export import export_gguf
    from lora_tuner import load_recipe, run

    tmp = tmp_path_factory.mktemp("guard")
    base = Path(tiny_base("llama"))
    recipe = recipe_dict(str(base), alpaca_file, train={"max_steps": 4, "eval_steps": 2, "save_steps": 2,
                                                        "report_to": ["tensorboard"]})
    trained = run(load_recipe(write_recipe(tmp, recipe)), output=str(tmp / "run")).folder
    adapter = adapter_on(tiny_bpe_llama, tmp / "adapter")
    base_gguf = Path(export_gguf(tiny_bpe_llama, tmp / "base.gguf", kind="f16", verify=False).file)
    return Made(tmp, Path(alpaca_file), base, trained, Path(tiny_bpe_llama), adapter, base_gguf)


def adapter_on(base: Path, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    random_adapter(AutoModelForCausalLM.from_pretrained(base), folder, r=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return folder


# every writer, run the way users run it: each write under a path the guard granted
@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_write_of_a_command_is_under_a_path_the_guard_granted(made, tmp_path, command):
    recipe = write_recipe(tmp_path, recipe_dict(str(made.base), str(made.data), train={
        "max_steps": 2, "save_steps": 1, "eval_steps": 1, "report_to": ["tensorboard"]}))
    gguf = tmp_path / "m.gguf"
    args = {"run": ["run", recipe, "--output", tmp_path / "run"],
            "merge": ["merge", made.run, "--out", tmp_path / "merged"],
            "export": ["export", made.adapter, "--type", "f16", "--out", gguf],
            "import-gguf": ["import-gguf", made.base_gguf, "--out", tmp_path / "imported"],
            "eval": ["eval", shutil.copytree(made.run, tmp_path / "evaluated")]}[command]
    result, audit = invoke(args)
    assert result.exit_code == 0, result.output[-3000:]
    assert audit.grants and audit.writes
    assert audit.ungranted() == []


def test_a_lora_gguf_export_writes_only_where_the_guard_granted(made, tmp_path):
    pytest.importorskip("llama_cpp")
    result, audit = invoke(["export", made.adapter, "--format", "gguf-lora", "--base-gguf", made.base_gguf, "--out",
                            tmp_path / "lora.gguf", "--verify-rows", "4"])
    assert result.exit_code == 0, result.output[-3000:]
    assert audit.ungranted() == []


# every writer pointed at each of its inputs
def home(tmp: Path, name: str) -> Path:
    """A folder of its own for one input, so that 'holds' points at that input alone."""
    folder = tmp / f"{name}-home"
    folder.mkdir(exist_ok=True)
    return folder


def inputs_of(command: str, made: Made, tmp: Path) -> tuple[dict[str, Path], callable]:
    """(input name -> a fresh copy of that input, argv builder taking --out and --force) for one writer."""
    copy = {"dir": lambda src, name: Path(shutil.copytree(src, home(tmp, name) / src.name)),
            "file": lambda src, name: Path(shutil.copy(src, home(tmp, name) / src.name))}
    if command == "run":
        found = {"base": copy["dir"](made.base, "base"), "tokenizer": copy["dir"](made.base, "tokenizer"),
                 "start adapter": copy["dir"](made.run, "start"), "data file": copy["file"](made.data, "data")}
        recipe = write_recipe(tmp, recipe_dict(str(found["base"]), str(found["data file"]), model={
            "tokenizer": str(found["tokenizer"])}, init={"adapter": str(found["start adapter"])}))
        return found, lambda out, force: ["run", recipe, "--output", out, *force]
    bpe_base = copy["dir"](made.bpe_base, "base")
    adapter = adapter_on(bpe_base, home(tmp, "adapter") / "adapter")
    if command == "merge":
        return {"adapter": adapter, "base": bpe_base}, lambda out, force: ["merge", adapter, "--out", out, *force]
    if command == "export":
        return {"SOURCE": adapter, "base": bpe_base}, lambda out, force: ["export", adapter, "--out", out, *force]
    if command == "gguf-lora":
        base_gguf = copy["file"](made.base_gguf, "gguf")
        return ({"SOURCE": adapter, "base": bpe_base, "base GGUF": base_gguf},
                lambda out, force: ["export", adapter, "--format", "gguf-lora", "--base-gguf", base_gguf, "--out",
                                    out, *force])
    if command == "import-gguf":
        base_gguf = copy["file"](made.base_gguf, "gguf")
        return {"GGUF file": base_gguf}, lambda out, force: ["import-gguf", base_gguf, "--out", out, *force]
    raise ValueError(command)


COLLISIONS = [(command, name, relation, force)
              for command, names in {"run": ["base", "tokenizer", "start adapter", "data file"],
                                     "merge": ["adapter", "base"], "export": ["SOURCE", "base"],
                                     "gguf-lora": ["SOURCE", "base", "base GGUF"], "import-gguf": ["GGUF file"]}.items()
              for name in names for relation in ("is", "is inside", "holds") for force in (False, True)]
OUT_FIELD = {"run": "output"}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command,name,relation,force", COLLISIONS,
                         ids=[f"{c}-out-{r.replace(' ', '-')}-{n.replace(' ', '-')}" + ("-force" if f else "")
                              for c, n, r, f in COLLISIONS])
def test_an_output_on_an_input_is_refused_and_the_input_kept(made, tmp_path, command, name, relation, force):
    found, argv = inputs_of(command, made, tmp_path)
    target = found[name]
    out = {"is": target, "is inside": target / "out", "holds": target.parent}[relation]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, [str(a) for a in argv(out, ["--force"] if force else [])])
    assert result.exit_code == 2, result.output[-2000:]
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output[-2000:]
    field = OUT_FIELD.get(command, "--out")
    assert f": {field}: " in errors[0] and f"{relation} the {name} " in errors[0], errors[0]
    assert snapshot(tmp_path) == before


def test_eval_never_writes_its_report_over_the_rows_it_scores(made, tmp_path):
    run = Path(shutil.copytree(made.run, tmp_path / "run"))
    shutil.copy(made.data, run / "eval.json")  # the rows to score, kept where eval writes its report
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["eval", str(run), "--data", str(run / "eval.json")])
    assert result.exit_code == 2 and "FOLDER: " in result.output and "is the --data file" in result.output, \
        result.output[-2000:]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["run", "merge", "export", "import-gguf"])
def test_an_output_that_is_a_link_is_refused(made, tmp_path, command):
    """--force through a link would replace what it points at, which may be anything."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(elsewhere)
    (tmp_path / "in").mkdir()
    _, argv = inputs_of(command, made, tmp_path / "in")
    result = CliRunner().invoke(main, [str(a) for a in argv(tmp_path / "link", ["--force"])])
    assert result.exit_code == 2 and "is a symbolic link" in result.output, result.output[-2000:]
    assert (elsewhere / "keep.txt").read_text() == "mine"
