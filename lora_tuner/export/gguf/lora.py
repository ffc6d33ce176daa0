"""`lora-tune export RUN --format gguf-lora --base-gguf BASE.gguf`: the adapter alone as llama.cpp's LoRA GGUF, applied
to a base GGUF when it loads (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER line): one base file and
many small adapters instead of a full copy of the model per adapter.

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and llama-adapter.cpp reads: general.type "adapter",
adapter.type "lora", adapter.lora.alpha, and for each adapted weight NAME.lora_a (PEFT's A, [rank, in]) and
NAME.lora_b (B, [out, rank]) under the base tensor's GGUF name, B's rows permuted as the base's Q and K rows are.
llama.cpp scales by alpha / rank, rank read from each tensor. Written here with the `gguf` package because no installed
library turns a PEFT adapter into this file (llama.cpp's converter is a script in its source tree)."""
import time
from pathlib import Path

import numpy as np
import torch

from ...errors import about, fail
from ...run_folder import RunFolder
from ...verify import ROWS
from ...weights.gguf import gguf_shapes, model_file_type
from ..inputs import resolve_base, tokenizer_source
from ..lora_deltas import LoraDeltas
from ..merged_weights import streamed_source
from ..report import ExportReport, GgufVerification
from .beside import gguf_output, write_modelfile, write_report
from .writer import GgufExporter


def export_gguf_lora(source: str | Path, out: str | Path, base_gguf: str | Path | None, verify: bool = True,
                     verify_rows: int | None = None, force: bool = False) -> ExportReport:
    """Write a run's adapter alone as llama.cpp's LoRA GGUF, applied over the base's GGUF when it loads.

    Args:
        source: a run folder or a PEFT adapter folder.
        out: the LoRA .gguf file (its .Modelfile, FROM the base and ADAPTER this file, and report land beside it).
        base_gguf: the base model's GGUF the adapter is applied over.
        verify: have llama.cpp apply it over the base and compare with base + adapter on held-out rows.
        verify_rows: how many rows to verify on (default 16).
        force: replace an existing `out` and the files beside it.

    Example:
        export_gguf_lora("adapters/smollm2-135m-alpaca", "alpaca-lora.gguf", "smollm2-base.gguf")
    """
    with about(source):
        job = GgufLoraExport(Path(source), base_gguf, verify_rows or ROWS if verify else None)
        job.plan(out, force)
        return job.execute()


class GgufLoraExport:
    """One LoRA GGUF export in phases: plan (the adapter against the base GGUF's tensors, before llama.cpp sees the
    pair: it ends the whole process on one that does not fit), write, verify (in llama.cpp), report."""

    def __init__(self, source: Path, base_gguf: str | Path | None, rows: int | None):
        self.started, self.source, self.rows = time.time(), source, rows
        self.run = RunFolder(source)
        if not self.run.has_adapter:
            raise fail("SOURCE", "holds no adapter (adapter_config.json + adapter_model.safetensors)",
                       "point at a run folder or a PEFT adapter folder")
        if base_gguf is None or str(base_gguf).strip() == "":
            raise fail("--base-gguf", "a LoRA GGUF is applied over its base's GGUF, and none was given",
                       "export the base first (lora-tune export BASE --out base.gguf) and pass --base-gguf base.gguf")
        self.base_gguf = Path(base_gguf).expanduser().resolve()
        self.base_type = model_file_type(self.base_gguf, "--base-gguf")

    def plan(self, out: str | Path, force: bool) -> None:
        self.base = resolve_base(None, self.run)
        self.target = gguf_output(out, {"SOURCE": self.source, "base": self.base, "base GGUF": self.base_gguf})
        self.target.check_new(force)
        self.deltas = LoraDeltas(self.run.path)
        self.exporter = GgufExporter(self.base, "f16", model_name=self.source.resolve().name)
        self._check_fit()
        if self.rows:
            self._check_memory()

    def execute(self) -> ExportReport:
        with self.target.writing() as partial:
            _write(self.exporter, self.deltas, partial)
            verification = self.verify(partial) if self.rows else None
            report = ExportReport(source=str(self.source.resolve()), merged_on_the_fly=False,
                                  file=str(self.target.final), type="f16", bytes=partial.stat().st_size,
                                  seconds=time.time() - self.started, chat_template=False,
                                  modelfile=str(self.target.beside[0]), applies_to=str(self.base_gguf),
                                  verification=verification)
            write_report(self.target, report, "f16")
            write_modelfile(self.run.path, tokenizer_source(self.run, self.base), self.target.final,
                            [f"FROM {self.base_gguf}", f"ADAPTER ./{self.target.final.name}"])
            self.target.finish()
        return report

    def _check_fit(self) -> None:
        """Every adapted weight has its place in the base GGUF, with the adapter's shape: compared here, tensor by
        tensor, because llama.cpp given a pair that does not fit ends the whole process (a segmentation fault), and
        a file written without the check crashes llama.cpp and Ollama on the first token."""
        places = {key: self.exporter.tensor_name(key) for key in sorted(self.deltas.targets)}
        for key, place in places.items():
            if place is None:
                raise fail("adapter", f"{key!r} has no place in a llama GGUF", "export the merged model instead "
                           "(lora-tune export RUN --format gguf)")
        shapes = gguf_shapes(self.base_gguf)
        self.deltas.adapter.check_fits({key: shapes[place] for key, place in places.items() if place in shapes},
                                       str(self.base_gguf), "--base-gguf")

    def _check_memory(self) -> None:
        """llama.cpp reads the whole base GGUF when it applies an adapter (llama-cpp-python maps no file then), and
        repacks its weights for the CPU: twice the file, besides the streamed reference."""
        from ...plan import memory

        need = memory.for_gguf_adapter(memory.Shape.of_folder(self.base), self.base_gguf.stat().st_size,
                                       self.deltas.params, self.rows)
        memory.require(need, "memory", "verify on fewer rows (--verify-rows 4), or pass --no-verify")

    def verify(self, adapter_gguf: Path) -> GgufVerification:
        from ...verify.verdict import verification_rows, verify_gguf_adapter

        reference = streamed_source(self.base, "base + adapter (float32)", None, self.deltas)
        tokenizer_folder = tokenizer_source(self.run, self.base)
        checked = verification_rows(self.run, tokenizer_folder, reference.config, self.rows)
        # a base of a type lora-tune does not write (an Ollama Q4_K_M) is held to q4_0's threshold, the loosest known
        return verify_gguf_adapter(adapter_gguf, self.base_gguf, self.base_type or "q4_0", reference,
                                   tokenizer_folder, checked)


def _write(exporter: GgufExporter, deltas: LoraDeltas, path: Path) -> None:
    """lora_a and lora_b of every adapted weight, in f16. One alpha serves the file: an adapter whose modules differ
    in scale (rank_pattern, rsLoRA with several ranks) has the difference folded into its B."""
    import gguf

    keys = sorted(deltas.targets)
    _, right, scale = deltas.factors(keys[0])
    alpha = scale * right.shape[0]  # llama.cpp's scale is alpha / rank
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(exporter.model_name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key in keys:
        name = exporter.tensor_name(key)  # every adapted weight has one (_check_fit)
        left, right, scale = deltas.factors(key)  # left = B [out, rank], right = A [rank, in]
        b = exporter.rotary_layout(left * (scale * right.shape[0] / alpha), name)
        writer.add_tensor(f"{name}.lora_a", _f16(right))
        writer.add_tensor(f"{name}.lora_b", _f16(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _f16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float16).contiguous().numpy()
