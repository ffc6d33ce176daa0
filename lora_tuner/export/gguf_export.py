"""`lora-tune export --format gguf`: from a run folder (merged first, exactly as `lora-tune merge` merges) or a merged
export to one verified .gguf file, with an Ollama Modelfile beside it."""
import os
import shutil
import time
from pathlib import Path

import torch

from ..atomic_folder import disk_full, no_space
from ..errors import UserError, fail
from ..run_folder import RunFolder
from ..verify import ROWS
from .gguf_writer import TYPES, GgufExporter
from .report import ExportReport, GgufVerification
from .weights import MergedWeights


def export_gguf(source: str | Path, out: str | Path, kind: str = "q8_0", into: str = "auto", verify: bool = True,
                verify_rows: int | None = None, force: bool = False) -> ExportReport:
    started = time.time()
    source, out = Path(source), Path(out).expanduser().resolve()
    name = str(source)
    if kind not in TYPES:
        raise fail(name, "--type", f"{kind!r} is not a GGUF type lora-tune writes", f"use one of {', '.join(TYPES)}")
    run = RunFolder(source)
    if not run.has_adapter and not (source / "config.json").is_file():
        raise fail(name, "SOURCE", "neither a run folder nor a merged model folder",
                   "point at adapters/<run> or at a folder written by lora-tune merge")
    check_out(source, out, force, name)
    if verify:
        verify_rows = verify_rows or ROWS
    _check_memory(run, source, kind, verify_rows if verify else None, name)
    merged_dir = out.with_name(f".{out.name}.merged")
    partial = out.with_name(f".{out.name}.partial")
    temporaries = [merged_dir, merged_dir.with_name(f".{merged_dir.name}.partial")]
    try:
        if run.has_adapter:  # merge first, as `lora-tune merge` would (its defaults, its verification), in the
            from .merge import merge  # GGUF's own 16-bit type, so f16/bf16 files hold the merged weights exactly

            try:
                merge(source, merged_dir, dtype={"f16": "fp16", "bf16": "bf16"}.get(kind), into=into, force=True,
                      verify=verify, verify_rows=verify_rows)
            except UserError as error:
                if any(problem.field == "verification" for problem in error.problems):
                    temporaries.pop()  # the message points the user at the failed merge: it stays for a look
                raise
            model_folder = merged_dir
        else:
            model_folder = source
        exporter = GgufExporter(model_folder, kind, name, model_name=source.resolve().name)
        try:
            exporter.write(MergedWeights.of(model_folder, torch.float32, name), partial)
        except OSError as exc:
            if disk_full(exc):
                raise no_space(out.parent, name, "--out") from None
            raise
        verification = verify_file(partial, model_folder, kind, verify_rows) if verify else None
        report = ExportReport(source=str(source.resolve()), merged_on_the_fly=model_folder == merged_dir, file=str(out),
                              type=kind,
                              bytes=partial.stat().st_size, seconds=time.time() - started,
                              chat_template=exporter.has_chat_template, modelfile=str(out.with_suffix(".Modelfile")),
                              verification=verification)
        out.with_suffix(".export_report.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if verification is not None and not verification.passed:
            raise fail(name, "verification", f"the {kind} GGUF agrees with the merged model on "
                       f"{verification.top1_agreement:.1%} of top-1 tokens (needs {verification.min_top1:.1%})"
                       + ("" if verification.tokenizer_round_trip else " and its vocabulary encodes text differently"),
                       "try --type q8_0 or f16; the report is beside --out")
        write_modelfile(model_folder, model_folder, out, [f"FROM ./{out.name}"])
        os.replace(partial, out)  # last: the .gguf appears only when complete and verified
    finally:
        partial.unlink(missing_ok=True)
        for temporary in temporaries:
            shutil.rmtree(temporary, ignore_errors=True)
    return report


def check_out(source: Path, out: Path, force: bool, name: str) -> None:
    """--out and the files written beside it: outside SOURCE, new unless --force, in a folder that exists."""
    if out.is_relative_to(source.resolve()):
        raise fail(name, "--out", f"{str(out)!r} is inside SOURCE {str(source.resolve())!r}, which this command reads",
                   "choose an --out outside it")
    for existing in (out, out.with_suffix(".Modelfile"), out.with_suffix(".export_report.json")):
        if existing.exists() and not force:
            raise fail(name, "--out", f"{str(existing)!r} already exists", "choose another --out, or pass --force "
                       "to replace it")
    if not out.parent.is_dir():
        raise fail(name, "--out", f"folder {str(out.parent)!r} does not exist", "create it, or choose another --out")


def _check_memory(run: RunFolder, source: Path, kind: str, rows: int | None, name: str) -> None:
    """The writing and verification steps' memory, refused up front (plan/commands.py); merge checks its own.
    rows None: no verification."""
    from ..plan import commands

    if run.has_adapter:
        from .merge import resolve_base

        model_folder = resolve_base(None, run, name)
    else:
        model_folder = source
    need = commands.gguf_export(commands.Shape.of_folder(model_folder, name), kind, rows)
    commands.require(need, name, "memory", "verify on fewer rows (--verify-rows 4) or pass --no-verify"
                     if rows else "free some memory")


def verify_file(gguf_file: Path, model_folder: Path, kind: str, rows: int | None) -> GgufVerification:
    """A GGUF of `kind` against the merged model it was made from, both streamed a module at a time in float32 (also
    a file llama.cpp's own llama-quantize made: benchmarks/export.py judges both alike)."""
    from ..verify.verdict import Source, verification_rows, verify_gguf
    from .gguf_reader import gguf_weight_map
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
