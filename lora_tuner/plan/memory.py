"""Memory that merge, export, eval, generate and serve need on this machine, known before they write anything: a
command that would not fit is refused in one line naming the fix, instead of being killed halfway (verifying a 7B
the old way, in float32, passed 20 GB and was stopped). `lora-tune plan` shows the same figures after training's.

The figures are estimates from the model's shapes, calibrated on measured peaks (benchmarks/scale.py: LLaMA-7B
shape, benchmarks/results/scale-cpu-2cores.json). LORA_TUNE_MEMORY (e.g. 4GB, decimal units) sets the budget instead of the memory
this machine has available: for a shared machine, and for the tests."""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import sizes
from ..errors import about, fail
from ..verify import LLAMA_CPP_LOGITS_MAX_BYTES, MAX_LENGTH

FLOOR = 500 * 2**20  # python with torch, transformers, peft and accelerate imported: 470 MB measured
BYTES_PER_WEIGHT = {"4bit": 0.6, "8bit": 1.1}  # a quantized base in memory, its norms and embeddings included
ENVIRONMENT = "LORA_TUNE_MEMORY"
GGUF_BYTES_PER_WEIGHT = {"f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q6_k": 210 / 256,
                         "q5_k_m": 186 / 256, "q4_k_m": 156 / 256, "q5_k": 176 / 256, "q4_k": 144 / 256}  # _m: ~6% Q6_K


@dataclass
class Shape:
    """What the estimates read from a model: its size, its largest tensor and its text config's widths."""
    params: int
    largest: int  # elements
    hidden: int
    inner: int
    heads: int
    vocab: int

    @classmethod
    def of_config(cls, config: dict, params: int, largest: int) -> "Shape":
        hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
        heads = config.get("num_attention_heads") or config.get("n_head") or 1
        inner = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
        return cls(params, largest, hidden, inner, heads, config["vocab_size"])

    @classmethod
    def of_folder(cls, folder: Path) -> "Shape":
        """From a model folder's config.json and safetensors headers (nothing loaded)."""
        from ..weights.shards import base_shards
        from ..weights.safetensors import read_header

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        numels = [math.prod(info["shape"]) for shard in base_shards(folder)
                  for info in read_header(shard)[1].values()]
        return cls.of_config(config, sum(numels), max(numels))


@dataclass
class Need:
    what: str  # e.g. "merge with verification"
    parts: dict[str, int] = field(default_factory=dict)  # bytes by part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {sizes.show(size)}" for name, size in self.parts.items() if size)
        return f"{self.what:28s} {sizes.show(self.total):>9s}  ({parts})"


def verification(shape: Shape, rows: int) -> dict[str, int]:
    """A streamed verification (verify/streamed.py): a few copies of the largest tensor in float32 (read, merged,
    dequantized), one batch of activations, and the reference's logits kept at the response positions."""
    tokens = rows * MAX_LENGTH
    return {"largest tensor x3": 3 * 4 * shape.largest,
            "activations": 4 * tokens * (8 * shape.hidden + 3 * shape.inner) + 4 * 2 * rows * shape.heads * MAX_LENGTH**2,
            "logits": 3 * 4 * tokens * shape.vocab}


def for_merge(shape: Shape, lora_params: int, verify_rows: int | None, round_trip_4bit: bool) -> Need:
    need = Need("merge" + (" with verification" if verify_rows else ""),
                {"imports": FLOOR, "adapter": 2 * 4 * lora_params,
                 "4-bit round trip": 4 * 4 * shape.largest if round_trip_4bit else 0})
    if verify_rows:
        need.parts.update(verification(shape, verify_rows))
    return need


def for_gguf_export(shape: Shape, kind: str, verify_rows: int | None) -> Need:
    """Writing quantizes one float32 tensor at a time (gguf's numpy code makes a few copies); llama.cpp holds a file
    of up to 2 GiB whole to compute its logits (mapped, and its weights repacked for the CPU: twice the file)."""
    need = Need(f"gguf {kind}" + (" with verification" if verify_rows else ""),
                {"imports": FLOOR, "writing": 12 * shape.largest})
    if verify_rows:
        need.parts.update(verification(shape, verify_rows))
        size = int(shape.params * GGUF_BYTES_PER_WEIGHT[kind])
        need.parts["llama.cpp"] = 2 * size if size <= LLAMA_CPP_LOGITS_MAX_BYTES else 0
    return need


def for_gguf_adapter(shape: Shape, base_gguf_bytes: int, lora_params: int, verify_rows: int) -> Need:
    """A LoRA GGUF verified in llama.cpp: it reads the whole base GGUF when it applies an adapter (no mapping) and
    repacks its weights for the CPU, twice the file, besides the streamed reference."""
    need = Need("gguf-lora with verification", {"imports": FLOOR, "adapter": 2 * 4 * lora_params,
                                                "llama.cpp": 2 * base_gguf_bytes})
    need.parts.update(verification(shape, verify_rows))
    return need


def for_loaded_model(shape: Shape, dtype_bytes: float, what: str, extra: dict[str, int] | None = None) -> Need:
    """A model held in memory (AdapterPool: eval, generate, chat, serve): its weights in the dtype they are loaded in,
    and a batch's logits."""
    return Need(what, {"imports": FLOOR, "weights": int(shape.params * dtype_bytes),
                       "logits": 4 * 2 * 8 * MAX_LENGTH * shape.vocab, **(extra or {})})


def available() -> tuple[int, str]:
    """(bytes, where that figure comes from): LORA_TUNE_MEMORY when set, else this machine's available memory."""
    if ENVIRONMENT in os.environ:  # set but empty is a mistake to say, not a budget to ignore
        if not os.environ[ENVIRONMENT].strip():
            raise fail("value", "is set but empty", f"unset {ENVIRONMENT}, or give a size such as 4GB", source=ENVIRONMENT)
        with about(ENVIRONMENT):
            return sizes.parse(os.environ[ENVIRONMENT], "value"), ENVIRONMENT
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def require(need: Need, field_name: str, fix: str) -> None:
    """Refuse, before anything is written, what would not fit."""
    budget, where = available()
    if need.total > budget:
        raise fail(field_name, f"{need.what} needs about {sizes.show(need.total)}, {where} is "
                   f"{sizes.show(budget)}", fix)
