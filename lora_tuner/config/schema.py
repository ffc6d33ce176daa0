"""The recipe: one typed config. Each field's description is its one-line doc (`lora-tune validate --explain`)."""
import re
from typing import Any, Literal, Union, get_args

from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationInfo, field_validator,
                      model_validator)

from ..formats.registry import FORMATS, METHOD_KINDS
from ..formats.templates import slot_problems

DType = Literal["bfloat16", "float16", "float32"]
AutoDType = Literal["auto", "bfloat16", "float16", "float32"]


class Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key.
    # allow_inf_nan=False: .inf or .nan in YAML is never a meaningful setting, and would fail deep inside training.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers_nor_empty_text(cls, value, info: ValidationInfo):
        """pydantic reads true as 1 for a number field; `beta: true` is a mistake to report, not a beta of 1.0. An
        empty text is never a setting (an empty output.root would put the run in the current folder)."""
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{value!r} is a yes/no value, not what this field takes")
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give it a value, or leave the key out for its default")
        return value


def _admits_bool(annotation) -> bool:
    return annotation is bool or annotation is Any or any(_admits_bool(arg) for arg in get_args(annotation))


class ModelSection(Section):
    name_or_path: str | None = Field(
        None, description="Local folder or hub id of the base model (safetensors weights); omit with init: random."
    )
    revision: str = Field("main", description="Hub revision (branch, tag or commit) of the base model.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="pretrained: load weights; random: build from model.config with random weights."
    )
    config: dict[str, Any] | None = Field(
        None, description="transformers config fields (with model_type) for init: random, e.g. a tiny LLaMA."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer folder or hub id, a SentencePiece .model file, or 'bytes' (built in); "
        "default: the base model's.",
    )
    dtype: AutoDType = Field(
        "auto", description="Dtype of the unquantized base weights and of training arithmetic (LoRA weights and "
        "optimizer state stay fp32); auto: bfloat16 where the GPU or CPU computes it natively, else float16 on a GPU, "
        "float32 on a CPU.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto: SDPA on each packed example's own span (no work on masked-out "
        "blocks) where the architecture uses transformers' attention interface, else transformers' choice."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model; off unless you trust it.")
    allow_pickle: bool = Field(
        False, description="Allow pickled .bin weights (can execute code when loaded); safetensors otherwise."
    )

    @model_validator(mode="after")
    def _init_needs_its_source(self):
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("model.name_or_path is required when model.init is 'pretrained'")
        if self.init == "random":
            if not self.config or "model_type" not in self.config:
                raise ValueError("model.config with a model_type is required when model.init is 'random'")
            if not self.tokenizer:
                raise ValueError("model.tokenizer is required when model.init is 'random' (try 'bytes')")
        return self


class QuantizationSection(Section):
    mode: Literal["none", "8bit", "4bit"] = Field("none", description="Load the base 4-bit (QLoRA), 8-bit or unquantized.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit scaling constants too (saves ~0.4 bit/param).")
    compute_dtype: AutoDType = Field("auto", description="Dtype 4-bit weights are dequantized to for matmuls; auto: "
                                     "as model.dtype.")


class LoraSection(Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' or a list of module names, e.g. [q_proj, v_proj]."
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class TemplatePair(Section):
    with_input: str = Field(description="Prompt for rows with an input; uses {instruction} and {input}.")
    without_input: str = Field(description="Prompt for rows without an input; uses {instruction}.")

    @model_validator(mode="after")
    def _slots_are_the_formats(self):
        problems = [f"with_input: {p}" for p in slot_problems(self.with_input, ("instruction", "input"))]
        problems += [f"without_input: {p}" for p in slot_problems(self.without_input, ("instruction",))]
        if problems:
            raise ValueError("; ".join(problems) + " (placeholders are {instruction} and {input})")
        return self


class DataSection(Section):
    path: str = Field(
        description="Local .json/.jsonl/.parquet file, a hub data set id, or builtin:demo-tasks / "
        "builtin:demo-preferences (generated offline)."
    )
    format: Literal[tuple(FORMATS)] = Field(
        "alpaca", description="Row format; " + "; ".join(f"{name}: {f.doc}" for name, f in FORMATS.items()) + ".",
    )
    template: Union[Literal["alpaca"], TemplatePair] = Field(
        "alpaca", description="Prompt template for alpaca/dolly rows: 'alpaca' or {with_input, without_input}."
    )
    validation_size: float = Field(
        0.0, ge=0, description="Held-out rows for eval_loss: a fraction if < 1, else a row count."
    )
    max_length: int = Field(512, ge=8, le=131072, description="Longest tokenized example (prompt + response + EOS).")
    packing: bool = Field(True, description="Pack examples into full rows; attention never crosses examples.")
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: loss on the response only).")
    bad_rows: Literal["drop", "fail"] = Field(
        "drop", description="Malformed or too-long rows: drop them (reported) or stop with an error."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (quick trials).")


class PreferenceSettings(Section):
    beta: float = Field(0.1, gt=0, le=100, description="How far the trained model may move from the reference: higher "
                        "keeps it closer (the KL weight of DPO and KTO).")
    reference: Literal["start", "base"] = Field(
        "start", description="The frozen model rewards are measured against, at no second copy of the base: start: "
        "the model before this run (the init.adapter when given, else the base); base: the base without any adapter.")


class DpoSection(PreferenceSettings):
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"] = Field(
        "sigmoid", description="DPO loss (TRL's names): sigmoid is the paper's; ipo, hinge, robust (noisy labels, "
        "with label_smoothing), sigmoid_norm (length-normalised).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust: the share of pairs assumed mislabelled.")


class KtoSection(PreferenceSettings):
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable (label true) completions.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable (label false) completions; "
                                      "KTO's paper keeps desirable x count over undesirable x count within 1 to 4/3.")


class TrainSection(Section):
    method: Literal["sft", "dpo", "kto"] = Field(
        "sft", description="Training method: sft (supervised fine-tuning on the responses); dpo (direct preference "
        "optimisation on chosen/rejected pairs); kto (desirable/undesirable completions, paired or not).")
    dpo: DpoSection | None = Field(None, description="DPO settings (method: dpo only).")
    kto: KtoSection | None = Field(None, description="KTO settings (method: kto only).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: Union[Literal["auto"], PositiveInt] = Field(
        "auto", description="Rows per device per step (packed rows hold several examples); auto: the largest that "
        "fits the GPU per lora-tune plan, 2 on CPU.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup: float = Field(0.03, ge=0, description="Warm-up: a fraction of the steps if < 1, else a step count.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = Field(
        "adamw_torch", description="Optimizer; the 8-bit ones are bitsandbytes' (paged falls back to unpaged on CPU)."
    )
    gradient_checkpointing: Union[Literal["auto"], bool] = Field(
        "auto", description="Recompute activations in backward (less memory, ~30% slower); auto: only on a GPU "
        "the run would not fit otherwise (per lora-tune plan).")
    liger: Union[Literal["auto"], bool] = Field(
        "auto", description="Liger's fused kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); auto: on "
        "CUDA when liger-kernel is installed.")
    response_loss: Union[Literal["auto"], bool] = Field(
        "auto", description="Run the LM head on response tokens only, in chunks (no full logits; token accuracy from "
        "the same pass); auto: on when it equals the model's own loss, checked at start.")
    fused_lora: Union[Literal["auto"], bool] = Field(
        "auto", description="lora-tune's own LoRA layer while training (activations in the compute dtype, scaling and "
        "residual in one addmm, no frozen-weight gradient); auto: on for 16/32-bit bases, off for 4/8-bit ones "
        "(peft's bitsandbytes layers). Adapters are saved as peft saves them either way.")
    compile: Union[Literal["auto"], bool] = Field(
        "auto", description="torch.compile each decoder layer; auto: off (measured on CPU: no faster per step, "
        "a minute to compile; not measured on GPUs yet).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for weights init, data order and dropout.")
    logging_steps: int = Field(10, ge=1, description="Log loss every N steps (metrics.jsonl, tensorboard).")
    eval_steps: int = Field(100, ge=1, description="Evaluate on the validation rows every N steps.")
    save_steps: int = Field(200, ge=1, description="Write a checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        ["tensorboard"], description="Experiment trackers to log to."
    )

    @model_validator(mode="after")
    def _method_settings(self):
        for method in ("dpo", "kto"):
            if getattr(self, method) is not None and self.method != method:
                raise ValueError(f"train.{method} applies to method: {method} only (the method is {self.method!r})")
        if self.method in ("dpo", "kto") and getattr(self, self.method) is None:
            setattr(self, self.method, DpoSection() if self.method == "dpo" else KtoSection())
        return self


class DistributedSection(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "ddp", description="How several processes (torchrun / accelerate launch) share the work; one process "
        "ignores it. fsdp and zero3 shard the base across GPUs for models that do not fit one.")
    cpu_offload: bool = Field(False, description="fsdp / deepspeed: keep sharded parameters (zero: optimizer "
                              "state) in CPU memory; slower, for when even the shards do not fit.")


class OutputSection(Section):
    name: str = Field(max_length=200, description="Run name: the adapter lands in <root>/<name>/.")
    root: str = Field("adapters", description="Folder that holds run folders.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The name becomes a folder: nothing that could escape root or hide the folder.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        return name


class InitSection(Section):
    adapter: str | None = Field(
        None, description="Start from this adapter (a run folder or PEFT adapter folder of the same base, e.g. an SFT "
        "run before DPO) instead of a fresh one; lora.rank and alpha must be its own.")


class Recipe(Section):
    """A whole recipe. `file` is where it was read from (load_recipe), what its error lines name."""
    model: ModelSection
    init: InitSection = InitSection()
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()
    output: OutputSection
    _file: str | None = PrivateAttr(default=None)

    @property
    def file(self) -> str:
        return self._file or "recipe"

    @model_validator(mode="before")
    @classmethod
    def _preference_data_default(cls, raw):
        """A preference method's data are pairs unless the recipe says otherwise (TRL's prompt/chosen/rejected)."""
        if isinstance(raw, dict) and isinstance(raw.get("train"), dict) and isinstance(raw.get("data"), dict) \
                and raw["train"].get("method") in ("dpo", "kto") and "format" not in raw["data"]:
            raw = {**raw, "data": {**raw["data"], "format": "preference"}}
        return raw

    @model_validator(mode="after")
    def _method_fits_data(self):
        method, data = self.train.method, self.data
        kind = FORMATS[data.format].kind
        if kind not in METHOD_KINDS[method]:
            fits = [name for name, f in FORMATS.items() if f.kind in METHOD_KINDS[method]]
            raise ValueError(f"data.format {data.format!r} holds {kind} rows, which train.method {method!r} cannot "
                             f"train on; use one of: {', '.join(fits)}")
        if method != "sft":
            if "packing" not in data.model_fields_set:
                data.packing = False
            for name in ("packing", "train_on_inputs"):
                if name in data.model_fields_set and getattr(data, name):
                    raise ValueError(f"data.{name} applies to method: sft only (preference pairs are never packed "
                                     "and score responses only)")
            if self.train.response_loss is True:
                raise ValueError("train.response_loss applies to method: sft only")
        return self
