"""`lora-tune export --format gguf`: from a run folder (merged first, exactly as `lora-tune merge` merges) or a merged
export to one verified .gguf file, with an Ollama Modelfile beside it."""
import shutil
import time
from pathlib import Path

import torch

from ..errors import UserError, fail
from ..outputs import OutputFile, write_text
from ..run_folder import RunFolder
from ..verify import ROWS
from .gguf_writer import TYPES, GgufExporter
from .merge import resolve_base
from .report import ExportReport, GgufVerification
from .weights import MergedWeights

REPORT, FAILED_REPORT = ".export_report.json", ".failed.export_report.json"  # beside the .gguf


def export_gguf(source: str | Path, out: str | Path, kind: str = "q8_0", into: str = "auto", verify: bool = True,
                verify_rows: int | None = None, force: bool = False) -> ExportReport:
    started = time.time()
    source = Path(source)
    name = str(source)
    if kind not in TYPES:
        raise fail(name, "--type", f"{kind!r} is not a GGUF type lora-tune writes", f"use one of {', '.join(TYPES)}")
    run = RunFolder(source)
    if not run.has_adapter and not (source / "config.json").is_file():
        raise fail(name, "SOURCE", "neither a run folder nor a merged model folder",
                   "point at adapters/<run> or at a folder written by lora-tune merge")
    base_folder = resolve_base(None, run, name) if run.has_adapter else None
    target = gguf_output(out, {"SOURCE": source, "base": base_folder}, name)
    target.check_new(force)
    if verify:
        verify_rows = verify_rows or ROWS
    _check_memory(base_folder or source, kind, verify_rows if verify else None, name)
    merged_dir = target.temporary("merged")
    temporaries = [merged_dir, merged_dir.with_name(f".{merged_dir.name}.partial")]
    try:
        with target.writing() as partial:
            model_folder = _merged(source, merged_dir, kind, into, verify, verify_rows, temporaries) \
                if run.has_adapter else source
            exporter = GgufExporter(model_folder, kind, name, model_name=source.resolve().name)
            exporter.write(MergedWeights.of(model_folder, torch.float32, name), partial)
            verification = verify_file(partial, model_folder, kind, verify_rows) if verify else None
            report = ExportReport(source=str(source.resolve()), merged_on_the_fly=model_folder == merged_dir,
                                  file=str(target.final), type=kind, bytes=partial.stat().st_size,
                                  seconds=time.time() - started, chat_template=exporter.has_chat_template,
                                  modelfile=str(target.beside[0]), verification=verification)
            write_report(target, report, kind)
            write_modelfile(model_folder, model_folder, target.final, [f"FROM ./{target.final.name}"])
            target.finish()
    finally:
        for temporary in temporaries:
            shutil.rmtree(temporary, ignore_errors=True)
    return report


def gguf_output(out: str | Path, inputs: dict, name: str) -> OutputFile:
    """A GGUF file with its Ollama Modelfile and export report beside it, none of them on any input."""
    return OutputFile(out, "--out", "GGUF file", inputs, name, beside=(".Modelfile", REPORT))


def write_report(target: OutputFile, report: ExportReport, kind: str) -> None:
    """The report beside the file when it passed verification (or was not verified); when it failed, the report goes
    to NAME.failed.export_report.json, which a later export replaces without --force, and the export stops."""
    v = report.verification
    if v is None or v.passed:
        write_text(target.beside[1], report.model_dump_json(indent=2) + "\n")
        return
    failed = target.aside(FAILED_REPORT)
    write_text(failed, report.model_dump_json(indent=2) + "\n")
    judge = "the base + adapter" if report.applies_to else "the merged model"
    raise fail(target.source, "verification", f"the {kind} GGUF agrees with {judge} on {v.top1_agreement:.1%} of top-1 "
               f"tokens (needs {v.min_top1:.1%})" + ("" if v.tokenizer_round_trip else " and its vocabulary encodes "
                                                     "text differently") + f"; the report is {str(failed)!r}",
               export_fix(kind, report.applies_to))


def export_fix(kind: str, applies_to: str | None) -> str:
    """What to try when a GGUF fails its verification: a type that keeps more of the model, never the same one."""
    if applies_to:
        return "pass the GGUF of the base this adapter was trained on as --base-gguf (or an f16/q8_0 one of it)"
    if kind in ("f16", "bf16"):
        other = "bf16" if kind == "f16" else "f16"
        return f"try --type {other}; if that fails too, report it with the export report"
    better = [k for k in ("q8_0", "f16") if k != kind]
    return f"try a type that keeps more of the model: --type {' or '.join(better)}"


def _merged(source: Path, merged_dir: Path, kind: str, into: str, verify: bool, rows: int | None,
            temporaries: list[Path]) -> Path:
    """A run folder merged first, as `lora-tune merge` would (its defaults, its verification), in the GGUF's own 16-bit
    type, so f16/bf16 files hold the merged weights exactly. A failed verification leaves the merge for a look."""
    from .merge import merge

    try:
        merge(source, merged_dir, dtype={"f16": "fp16", "bf16": "bf16"}.get(kind), into=into, force=True,
              verify=verify, verify_rows=rows)
    except UserError as error:
        if any(problem.field == "verification" for problem in error.problems):
            temporaries.pop()  # the message points the user at the failed merge: it stays
        raise
    return merged_dir


def _check_memory(model_folder: Path, kind: str, rows: int | None, name: str) -> None:
    """The writing and verification steps' memory, refused up front (plan/commands.py); merge checks its own.
    rows None: no verification."""
    from ..plan import commands

    need = commands.gguf_export(commands.Shape.of_folder(model_folder, name), kind, rows)
    commands.require(need, name, "memory", "verify on fewer rows (--verify-rows 4) or pass --no-verify"
                     if rows else "free some memory")


def verify_file(gguf_file: Path, model_folder: Path, kind: str, rows: int | None) -> GgufVerification:
    """A GGUF of `kind` against the merged model it was made from, both streamed a module at a time in float32 (also
    a file llama.cpp's own llama-quantize made: benchmarks/export.py judges both alike)."""
    from ..verify.verdict import Source, verification_rows, verify_gguf
    from ..weights.gguf import gguf_weight_map
    from .weights import streamed_source

    merged = streamed_source(model_folder, "the merged model", str(model_folder))
    checked = verification_rows(RunFolder(model_folder), model_folder, merged.config, rows)
    return verify_gguf(gguf_file, Source(merged.config, gguf_weight_map(gguf_file, merged.config), "the gguf"),
                       merged, model_folder, kind, checked)


def write_modelfile(recipe_folder: Path, tokenizer_folder: Path, out: Path, lines: list[str]) -> None:
    """An Ollama Modelfile beside the GGUF: `lines` (FROM, ADAPTER), then a prompt template that renders the training
    prompt (instruction formats; a chat-format model keeps the chat template inside the GGUF) and a stop at the
    training EOS."""
    from transformers import AutoTokenizer

    from ..data.formats import FORMATS
    from ..data.templates import resolve

    eos, lines = AutoTokenizer.from_pretrained(tokenizer_folder).eos_token, list(lines)
    recipe_file = recipe_folder / RunFolder.RECIPE
    if recipe_file.is_file():
        data = RunFolder(recipe_folder).recipe().data
        prompt = FORMATS[data.format].prompt_for("\x00", resolve(data.template))
        if isinstance(prompt, str):  # the training prompt with the user's text where the instruction goes
            template = prompt.replace("{{", '{{ "{{" }}').replace("\x00", "{{ .Prompt }}")
            lines.append(f'TEMPLATE """{template}{{{{ .Response }}}}"""')
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    out.with_suffix(".Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
