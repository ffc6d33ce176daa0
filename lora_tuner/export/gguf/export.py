"""`lora-tune export --format gguf`: from a run folder (merged first, exactly as `lora-tune merge` merges) or a merged
export to one .gguf file, written, then verified through verify/ (by llama.cpp itself where its binding is
installed), with an Ollama Modelfile beside it."""
import shutil
import time
from pathlib import Path

import torch

from ...errors import UserError, about, fail
from ...run_folder import RunFolder
from ...verify import ROWS
from ..inputs import resolve_base
from ..merged_weights import MergedWeights, streamed_source
from ..report import ExportReport, GgufVerification
from .beside import gguf_output, write_modelfile, write_report
from .writer import TYPES, GgufExporter


def export_gguf(source: str | Path, out: str | Path, kind: str = "q8_0", into: str = "auto", verify: bool = True,
                verify_rows: int | None = None, force: bool = False) -> ExportReport:
    """Write a run (merged on the fly) or a merged export as one GGUF file for llama.cpp, Ollama and GPT4All.

    Args:
        source: a run folder or a folder written by lora-tune merge.
        out: the .gguf file (its .Modelfile and .export_report.json land beside it).
        kind: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q5_k or q4_k.
        into: for a QLoRA run, what the adapter is merged into (as merge's `into`).
        verify: load the file (in llama.cpp where installed) and compare it with the merged model on held-out rows.
        verify_rows: how many rows to verify on (default 16).
        force: replace an existing `out` and the files beside it.

    Example:
        report = export_gguf("adapters/smollm2-135m-alpaca", "smollm2-alpaca.gguf", kind="q8_0")
    """
    with about(source):
        job = GgufExport(Path(source), kind, into, verify_rows or ROWS if verify else None)
        job.plan(out, force)
        return job.execute()


class GgufExport:
    """One GGUF export in phases: plan (every check before anything is written), write (merged first when the source
    is a run), verify, report."""

    def __init__(self, source: Path, kind: str, into: str, rows: int | None):
        if kind not in TYPES:
            raise fail("--type", f"{kind!r} is not a GGUF type lora-tune writes", f"use one of {', '.join(TYPES)}")
        self.started, self.source, self.kind, self.into, self.rows = time.time(), source, kind, into, rows
        self.run = RunFolder(source)
        if not self.run.has_adapter and not (source / "config.json").is_file():
            raise fail("SOURCE", "neither a run folder nor a merged model folder",
                       "point at adapters/<run> or at a folder written by lora-tune merge")

    def plan(self, out: str | Path, force: bool) -> None:
        base = resolve_base(None, self.run) if self.run.has_adapter else None
        self.target = gguf_output(out, {"SOURCE": self.source, "base": base})
        self.target.check_new(force)
        _check_memory(base or self.source, self.kind, self.rows)

    def execute(self) -> ExportReport:
        merged_dir = self.target.temporary("merged")
        temporaries = [merged_dir, merged_dir.with_name(f".{merged_dir.name}.partial")]
        try:
            with self.target.writing() as partial:
                folder = self._merged(merged_dir, temporaries) if self.run.has_adapter else self.source
                exporter = GgufExporter(folder, self.kind, model_name=self.source.resolve().name)
                exporter.write(MergedWeights.of(folder, torch.float32), partial)
                verification = verify_file(partial, folder, self.kind, self.rows) if self.rows else None
                report = ExportReport(source=str(self.source.resolve()), merged_on_the_fly=folder == merged_dir,
                                      file=str(self.target.final), type=self.kind, bytes=partial.stat().st_size,
                                      seconds=time.time() - self.started, chat_template=exporter.has_chat_template,
                                      modelfile=str(self.target.beside[0]), verification=verification)
                write_report(self.target, report, self.kind)
                write_modelfile(folder, folder, self.target.final, [f"FROM ./{self.target.final.name}"])
                self.target.finish()
        finally:
            for temporary in temporaries:
                shutil.rmtree(temporary, ignore_errors=True)
        return report

    def _merged(self, merged_dir: Path, temporaries: list[Path]) -> Path:
        """The run merged first, as `lora-tune merge` would (its defaults, its verification), in the GGUF's own 16-bit
        type, so f16/bf16 files hold the merged weights exactly. A failed verification leaves the merge for a look."""
        from ..safetensors.merge import merge

        try:
            merge(self.source, merged_dir, dtype={"f16": "fp16", "bf16": "bf16"}.get(self.kind), into=self.into,
                  force=True, verify=self.rows is not None, verify_rows=self.rows)
        except UserError as error:
            if any(problem.field == "verification" for problem in error.problems):
                temporaries.pop()  # the message points the user at the failed merge: it stays
            raise
        return merged_dir


def _check_memory(model_folder: Path, kind: str, rows: int | None) -> None:
    """The writing and verification steps' memory, refused up front (plan/memory.py); merge checks its own.
    rows None: no verification."""
    from ...plan import memory

    need = memory.for_gguf_export(memory.Shape.of_folder(model_folder), kind, rows)
    memory.require(need, "memory", "verify on fewer rows (--verify-rows 4) or pass --no-verify" if rows else
                   "free some memory")


def verify_file(gguf_file: Path, model_folder: Path, kind: str, rows: int | None) -> GgufVerification:
    """A GGUF of `kind` against the merged model it was made from, both streamed a module at a time in float32 (also
    a file llama.cpp's own llama-quantize made: benchmarks/export.py judges both alike)."""
    from ...verify.verdict import Source, verification_rows, verify_gguf
    from ...weights.gguf import gguf_weight_map

    merged = streamed_source(model_folder, "the merged model")
    checked = verification_rows(RunFolder(model_folder), model_folder, merged.config, rows)
    return verify_gguf(gguf_file, Source(merged.config, gguf_weight_map(gguf_file, merged.config), "the gguf"),
                       merged, model_folder, kind, checked)
