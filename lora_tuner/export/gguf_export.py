"""`lora-tune export --format gguf`: from a run folder (merged first, exactly as `lora-tune merge` merges) or a merged
export to one verified .gguf file, with an Ollama Modelfile beside it."""
import os
import shutil
import time
from pathlib import Path

import torch

from ..errors import fail
from ..run_folder import RunFolder
from .gguf_writer import TYPES, GgufExporter
from .report import ExportReport, GgufVerification
from .weights import MergedWeights

# Top-1 agreement with the merged model on held-out rows, by type. f16/bf16 hold the merged weights exactly (when
# merged in that dtype): 100% measured. q8_0 and q4_0 from SmolLM2-135M (16 held-out rows, 1,002 tokens): 98.7% and
# 70.3%; a 135M model loses much to 4 bits, and a broken export (e.g. unpermuted Q/K rows) agrees on a few percent.
MIN_TOP1 = {"f16": 0.999, "bf16": 0.999, "q8_0": 0.95, "q4_0": 0.60}
SAMPLE_TEXT = ["Hello world! 123 + 456 = 579.", "  leading spaces, tabs\tand\nnewlines", "naïve café, 東京, emoji 🙂",
               "def f(x):\n    return {'a': [1, 2]}"]


def export_gguf(source: str | Path, out: str | Path, kind: str = "q8_0", into: str = "auto", verify: bool = True,
                verify_rows: int | None = None, force: bool = False) -> ExportReport:
    started = time.time()
    source, out = Path(source), Path(out).expanduser().resolve()
    name = str(source)
    if kind not in TYPES:
        raise fail(name, "--type", f"{kind!r} is not a GGUF type lora-tune writes", f"use one of {', '.join(TYPES)}")
    if out.exists() and not force:
        raise fail(name, "--out", f"{str(out)!r} already exists", "choose another --out, or pass --force to replace it")
    if not out.parent.is_dir():
        raise fail(name, "--out", f"folder {str(out.parent)!r} does not exist", "create it, or choose another --out")
    run = RunFolder(source)
    merged_dir = out.with_name(f".{out.name}.merged")
    partial = out.with_name(f".{out.name}.partial")
    try:
        if run.has_adapter:  # merge first, as `lora-tune merge` would (its defaults, its verification), in the
            from .merge import merge  # GGUF's own 16-bit type, so f16/bf16 files hold the merged weights exactly

            merge(source, merged_dir, dtype={"f16": "fp16", "bf16": "bf16"}.get(kind), into=into, force=True,
                  verify=verify, verify_rows=verify_rows)
            model_folder = merged_dir
        elif (source / "config.json").is_file():
            model_folder = source
        else:
            raise fail(name, "SOURCE", "neither a run folder nor a merged model folder",
                       "point at adapters/<run> or at a folder written by lora-tune merge")
        exporter = GgufExporter(model_folder, kind, name)
        exporter.write(MergedWeights.of(model_folder, torch.float32, name), partial)
        verification = _verify(partial, model_folder, kind, verify_rows) if verify else None
        report = ExportReport(source=str(source.resolve()), merged_on_the_fly=model_folder == merged_dir, file=str(out),
                              type=kind,
                              bytes=partial.stat().st_size, seconds=time.time() - started,
                              chat_template=exporter.has_chat_template, modelfile=str(out.with_suffix(".Modelfile")),
                              verification=verification)
        out.with_suffix(".export_report.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if verification is not None and not verification.passed:
            raise fail(name, "verification", f"the {kind} GGUF agrees with the merged model on "
                       f"{verification.top1_agreement:.1%} of top-1 tokens (needs {verification.min_top1:.0%})"
                       + ("" if verification.tokenizer_round_trip else " and its vocabulary encodes text differently"),
                       "try --type q8_0 or f16; the report is beside --out")
        _write_modelfile(model_folder, out)
        os.replace(partial, out)  # last: the .gguf appears only when complete and verified
    finally:
        partial.unlink(missing_ok=True)
        for temporary in (merged_dir, merged_dir.with_name(f".{merged_dir.name}.partial")):
            shutil.rmtree(temporary, ignore_errors=True)
    return report


def _verify(gguf_file: Path, model_folder: Path, kind: str, rows: int | None) -> GgufVerification:
    """The GGUF read back through an independent reader (transformers' GGUF loader, which dequantizes it) against
    the merged model, both in float32, on the run's held-out rows; and its vocabulary against the tokenizer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..eval.scoring import agreement, reference_logits
    from .verify import ROWS, verification_rows

    batches, count, held_out = verification_rows(RunFolder(model_folder), model_folder, rows or ROWS)
    merged = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    want = reference_logits(merged, batches, desc="scoring the merged model")
    del merged  # one model in memory at a time
    read_back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    found = agreement(read_back, want, batches, desc="verifying the gguf")
    ours = AutoTokenizer.from_pretrained(model_folder)
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    round_trip = all(ours(text)["input_ids"] == theirs(text)["input_ids"] for text in SAMPLE_TEXT)
    return GgufVerification(rows=count, held_out=held_out, tokens=found.tokens, top1_agreement=found.top1_agreement,
                            mean_kl=found.mean_kl, max_abs_logit_diff=found.max_abs_logit_diff,
                            tokenizer_round_trip=round_trip, min_top1=MIN_TOP1[kind],
                            passed=round_trip and found.top1_agreement >= MIN_TOP1[kind])


def _write_modelfile(model_folder: Path, out: Path) -> None:
    """An Ollama Modelfile beside the GGUF: its prompt template renders the training prompt (instruction formats;
    a chat-format model keeps the chat template inside the GGUF), and generation stops at the training EOS."""
    from transformers import AutoTokenizer

    from ..data.formats import FORMATS
    from ..data.templates import resolve

    eos = AutoTokenizer.from_pretrained(model_folder).eos_token
    lines = [f"FROM ./{out.name}"]
    recipe_file = model_folder / RunFolder.RECIPE
    if recipe_file.is_file():
        data = RunFolder(model_folder).recipe().data
        prompt = FORMATS[data.format].prompt_for("\x00", resolve(data.template))
        if isinstance(prompt, str):  # the training prompt with the user's text where the instruction goes
            template = prompt.replace("{{", '{{ "{{" }}').replace("\x00", "{{ .Prompt }}")
            lines.append(f'TEMPLATE """{template}{{{{ .Response }}}}"""')
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    out.with_suffix(".Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
