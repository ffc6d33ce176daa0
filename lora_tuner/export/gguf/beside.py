"""What a GGUF export leaves beside the file: the output (the .gguf with its Ollama Modelfile and export report, all
guarded as one), the Modelfile that prompts as training did, and the report, whose failure says what to try."""
from pathlib import Path

from ...errors import fail
from ...outputs import OutputFile, write_text
from ...run_folder import RunFolder
from ..report import ExportReport

REPORT, FAILED_REPORT = ".export_report.json", ".failed.export_report.json"  # beside the .gguf


def gguf_output(out: str | Path, inputs: dict) -> OutputFile:
    """A GGUF file with its Ollama Modelfile and export report beside it, none of them on any input."""
    return OutputFile(out, "--out", "GGUF file", inputs, beside=(".Modelfile", REPORT))


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
    raise fail("verification", f"the {kind} GGUF agrees with {judge} on {v.top1_agreement:.1%} of top-1 "
               f"tokens (needs {v.min_top1:.1%})" + ("" if v.tokenizer_round_trip else " and its vocabulary encodes "
                                                     "text differently") + f"; the report is {str(failed)!r}",
               export_fix(kind, report.applies_to), source=target.source)


def export_fix(kind: str, applies_to: str | None) -> str:
    """What to try when a GGUF fails its verification: a type that keeps more of the model, never the same one."""
    if applies_to:
        return "pass the GGUF of the base this adapter was trained on as --base-gguf (or an f16/q8_0 one of it)"
    if kind in ("f16", "bf16"):
        other = "bf16" if kind == "f16" else "f16"
        return f"try --type {other}; if that fails too, report it with the export report"
    better = [k for k in ("q8_0", "f16") if k != kind]
    return f"try a type that keeps more of the model: --type {' or '.join(better)}"


def write_modelfile(recipe_folder: Path, tokenizer_folder: Path, out: Path, lines: list[str]) -> None:
    """An Ollama Modelfile beside the GGUF: `lines` (FROM, ADAPTER), then a prompt template that renders the training
    prompt (instruction formats; a chat-format model keeps the chat template inside the GGUF) and a stop at the
    training EOS."""
    from transformers import AutoTokenizer

    from ...formats.registry import FORMATS
    from ...formats.templates import resolve

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
