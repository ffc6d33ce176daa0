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

from ..errors import fail
from ..run_folder import RunFolder
from ..verify import ROWS
from .gguf_export import gguf_output, write_modelfile, write_report
from ..weights.gguf import gguf_shapes, model_file_type
from .gguf_writer import GgufExporter
from .lora_deltas import LoraDeltas
from .merge import resolve_base, tokenizer_source
from .report import ExportReport


def export_gguf_lora(source: str | Path, out: str | Path, base_gguf: str | Path | None, verify: bool = True,
                     verify_rows: int | None = None, force: bool = False) -> ExportReport:
    started = time.time()
    source = Path(source)
    name = str(source)
    run = RunFolder(source)
    if not run.has_adapter:
        raise fail(name, "SOURCE", "holds no adapter (adapter_config.json + adapter_model.safetensors)",
                   "point at a run folder or a PEFT adapter folder")
    if base_gguf is None or str(base_gguf).strip() == "":
        raise fail(name, "--base-gguf", "a LoRA GGUF is applied over its base's GGUF, and none was given",
                   "export the base first (lora-tune export BASE --out base.gguf) and pass --base-gguf base.gguf")
    base_gguf = Path(base_gguf).expanduser().resolve()
    base_type = model_file_type(base_gguf, name, "--base-gguf")
    base_folder = resolve_base(None, run, name)
    target = gguf_output(out, {"SOURCE": source, "base": base_folder, "base GGUF": base_gguf}, name)
    target.check_new(force)
    deltas = LoraDeltas(run.path, name)
    exporter = GgufExporter(base_folder, "f16", name, model_name=source.resolve().name)
    _check_fit(exporter, deltas, base_gguf, name)  # llama.cpp crashes the process on a pair that does not fit
    if verify:
        _check_memory(base_folder, base_gguf, deltas, verify_rows or ROWS, name)
    with target.writing() as partial:
        _write(exporter, deltas, partial)
        verification = _verify(partial, base_gguf, base_type, run, base_folder, deltas, verify_rows or ROWS, name) \
            if verify else None
        report = ExportReport(source=str(source.resolve()), merged_on_the_fly=False, file=str(target.final),
                              type="f16", bytes=partial.stat().st_size, seconds=time.time() - started,
                              chat_template=False, modelfile=str(target.beside[0]), applies_to=str(base_gguf),
                              verification=verification)
        write_report(target, report, "f16")
        write_modelfile(run.path, tokenizer_source(run, base_folder), target.final,
                        [f"FROM {base_gguf}", f"ADAPTER ./{target.final.name}"])
        target.finish()
    return report


def _check_fit(exporter: GgufExporter, deltas: LoraDeltas, base_gguf: Path, name: str) -> None:
    """Every adapted weight has its place in the base GGUF, with the adapter's shape: compared here, tensor by
    tensor, because llama.cpp given a pair that does not fit ends the whole process (a segmentation fault), and a
    file written without the check crashes llama.cpp and Ollama on the first token."""
    places = {key: exporter.tensor_name(key) for key in sorted(deltas.targets)}
    for key, place in places.items():
        if place is None:
            raise fail(name, "adapter", f"{key!r} has no place in a llama GGUF", "export the merged model instead "
                       "(lora-tune export RUN --format gguf)")
    shapes = gguf_shapes(base_gguf)
    deltas.adapter.check_fits({key: shapes[place] for key, place in places.items() if place in shapes},
                              str(base_gguf), "--base-gguf")


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


def _check_memory(base_folder: Path, base_gguf: Path, deltas: LoraDeltas, rows: int, name: str) -> None:
    """llama.cpp reads the whole base GGUF when it applies an adapter (llama-cpp-python maps no file then), and
    repacks its weights for the CPU: twice the file, besides the streamed reference."""
    from ..plan import commands

    need = commands.gguf_adapter(commands.Shape.of_folder(base_folder, name), base_gguf.stat().st_size, deltas.params,
                                 rows)
    commands.require(need, name, "memory", "verify on fewer rows (--verify-rows 4), or pass --no-verify")


def _verify(adapter_gguf: Path, base_gguf: Path, base_type: str | None, run: RunFolder, base_folder: Path,
            deltas: LoraDeltas, rows: int, name: str):
    from ..verify.verdict import verification_rows, verify_gguf_adapter
    from .weights import streamed_source

    reference = streamed_source(base_folder, "base + adapter (float32)", name, None, deltas)
    tokenizer_folder = tokenizer_source(run, base_folder)
    checked = verification_rows(run, tokenizer_folder, reference.config, rows)
    # a base of a type lora-tune does not write (an Ollama Q4_K_M) is held to q4_0's threshold, the loosest known
    return verify_gguf_adapter(adapter_gguf, base_gguf, base_type or "q4_0", reference, tokenizer_folder, checked)
