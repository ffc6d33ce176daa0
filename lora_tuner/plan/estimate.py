"""`lora-tune plan`: memory breakdown and time estimate from the config, the recipe and the data, no weights."""
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig

from ..config.schema import Recipe
from ..data.reading import BUILTIN_DEMO, is_local
from ..errors import fail
from ..model.anatomy import meta_model, quantized_linears
from .gpus import GIB, GPUS, Gpu
from .known_configs import KNOWN, KNOWN_DATA

def usable_memory(total_bytes: int) -> int:
    """The memory budget both `plan` and `run` decide against: ~10% of a GPU goes to the CUDA context, kernels'
    workspaces and fragmentation."""
    return int(0.9 * total_bytes)


PLANNING_MFU = 0.4  # fraction of peak a well-fed LoRA run reaches; measured runs are in benchmarks/results
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Plan:
    gpu: Gpu
    params: int  # base model parameters
    quantized_params: int  # in linear layers that bitsandbytes replaces
    lora_params: int
    matmul_params: int  # weights of every linear layer, lm_head included: 2 FLOPs per token each way
    memory: dict[str, int]  # bytes per component
    tokens: int | None  # tokens the run will train on (all epochs)
    tokens_note: str
    checkpointing: bool
    batch_size: int

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= usable_memory(self.gpu.memory_bytes)

    @property
    def flops_per_token(self) -> int:
        passes = 3 if self.checkpointing else 2  # forward, input-gradient backward, and a recompute
        return 2 * self.matmul_params * passes

    @property
    def seconds(self) -> float | None:
        if self.tokens is None:
            return None
        return self.tokens * self.flops_per_token / (self.gpu.tflops * 1e12 * PLANNING_MFU)

    def lines(self) -> list[str]:
        rows = [f"parameters      {_count(self.params):>10s}  ({_count(self.quantized_params)} quantized, "
                f"LoRA {_count(self.lora_params)} trainable)"]
        rows += [f"{name:15s} {size / GIB:8.2f} GiB" for name, size in self.memory.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"{'batch':15s} {self.batch_size:>8d} rows, gradient checkpointing "
                    f"{'on' if self.checkpointing else 'off'}")
        rows.append(f"{'total':15s} {self.total_bytes / GIB:8.2f} GiB  -> {verdict} in {self.gpu.name}'s "
                    f"{usable_memory(self.gpu.memory_bytes) / GIB:.2f} GiB usable")
        if self.seconds is None:
            rows.append(f"time            unknown: {self.tokens_note}")
        else:
            rows.append(f"time            {self.seconds / 60:8.1f} min for {self.tokens / 1e6:.2f} M tokens "
                        f"({self.tokens_note}) at {PLANNING_MFU:.0%} of {self.gpu.tflops:g} TFLOP/s")
        return rows


def for_gpu(recipe: Recipe, gpu: Gpu) -> Recipe:
    """'auto' dtypes as `lora-tune run` resolves them on this GPU."""
    native = "bfloat16" if gpu.bf16 else "float16"
    dtype = native if recipe.model.dtype == "auto" else recipe.model.dtype
    compute = dtype if recipe.quantization.compute_dtype == "auto" else recipe.quantization.compute_dtype
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": dtype}),
                                     "quantization": recipe.quantization.model_copy(update={"compute_dtype": compute})})


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


@dataclass
class Anatomy:
    config: PretrainedConfig
    params: int
    quantized: dict  # name -> Linear that bitsandbytes replaces
    linears: dict  # name -> every Linear, lm_head included
    lora_params: int


def anatomy(recipe: Recipe, source: str) -> Anatomy:
    config = model_config(recipe, source)
    model = meta_model(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return Anatomy(
        config=config, params=sum(p.numel() for p in model.parameters()),
        quantized=quantized_linears(model) if recipe.quantization.mode != "none" else {}, linears=linears,
        lora_params=sum(recipe.lora.rank * (m.in_features + m.out_features)
                        for m in lora_targets(recipe, linears, model).values()),
    )


def make_plan(recipe: Recipe, source: str, gpu: str, tokens: int | None = None, world_size: int = 1) -> Plan:
    """Per-GPU memory and wall time; with several GPUs, the recipe's distributed strategy says what is sharded."""
    parts = anatomy(recipe, source)
    recipe = for_gpu(recipe, GPUS[gpu])
    recipe = fit_to_memory(recipe, parts, usable_memory(GPUS[gpu].memory_bytes))  # as `lora-tune run` decides
    checkpointing = recipe.train.gradient_checkpointing
    counted_tokens, note = _tokens(recipe, source, tokens)
    memory = _memory(recipe, parts, checkpointing)
    if world_size > 1:
        counted_tokens = counted_tokens // world_size if counted_tokens else counted_tokens  # each GPU's share
        note += f", split over {world_size} GPUs ({recipe.distributed.strategy})"
        sharded = {"ddp": (), "deepspeed-zero2": ("LoRA + Adam",),
                   "fsdp": ("weights", "quant consts", "LoRA + Adam"),
                   "deepspeed-zero3": ("weights", "quant consts", "LoRA + Adam")}[recipe.distributed.strategy]
        memory = {name: size // world_size if name in sharded else size for name, size in memory.items()}
    return Plan(
        gpu=GPUS[gpu], params=parts.params, quantized_params=sum(m.weight.numel() for m in parts.quantized.values()),
        lora_params=parts.lora_params, matmul_params=sum(m.weight.numel() for m in parts.linears.values()),
        memory=memory, tokens=counted_tokens, tokens_note=note, checkpointing=checkpointing,
        batch_size=recipe.train.batch_size,
    )


AUTO_BATCHES = (64, 32, 16, 8, 4, 2, 1)  # packed rows of data.max_length tokens
MIN_BATCH_WITHOUT_CHECKPOINTING = 4  # below this, recomputing activations costs less than tiny batches do


def fit_to_memory(recipe: Recipe, parts: "Anatomy", budget: float) -> Recipe:
    """Resolve train.batch_size and train.gradient_checkpointing when 'auto': the largest batch that fits the
    budget without checkpointing if that is at least a few rows, else the largest that fits with it."""
    train = recipe.train
    batches = AUTO_BATCHES if train.batch_size == "auto" else (train.batch_size,)
    choices = (False, True) if train.gradient_checkpointing == "auto" else (train.gradient_checkpointing,)
    for checkpointing in choices:
        for batch in batches:
            trial = recipe.model_copy(update={"train": train.model_copy(update={"batch_size": batch})})
            fits = sum(_memory(trial, parts, checkpointing).values()) <= budget
            enough = checkpointing or len(choices) == 1 or batch >= min(MIN_BATCH_WITHOUT_CHECKPOINTING, batches[0])
            if fits and enough:
                return recipe.model_copy(update={"train": train.model_copy(update={
                    "batch_size": batch, "gradient_checkpointing": checkpointing})})
    # nothing fits: the smallest, most frugal setting, and `plan` will say it does not fit
    return recipe.model_copy(update={"train": train.model_copy(update={
        "batch_size": batches[-1], "gradient_checkpointing": choices[-1]})})


def model_config(recipe: Recipe, source: str) -> PretrainedConfig:
    model = recipe.model
    if model.init == "random":
        return AutoConfig.for_model(**model.config)
    if model.name_or_path in KNOWN:
        return AutoConfig.for_model(**KNOWN[model.name_or_path])
    try:  # a local folder, or a hub id already in the cache
        return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision)
    except OSError:
        raise fail(source, "model.name_or_path", f"no config.json for {model.name_or_path!r} on this machine",
                   "point it at a local model folder (only config.json is read)") from None


def lora_targets(recipe: Recipe, linears: dict, model) -> dict:
    """The linear layers peft wraps: all but the output head for all-linear, else names ending in a target."""
    if recipe.lora.target_modules == "all-linear":
        head = model.get_output_embeddings()
        return {n: m for n, m in linears.items() if m is not head}
    return {n: m for n, m in linears.items()
            if any(n == t or n.endswith("." + t) for t in recipe.lora.target_modules)}


def _memory(recipe: Recipe, parts: Anatomy, checkpointing: bool) -> dict[str, int]:
    config, params, quantized, lora_params = parts.config, parts.params, parts.quantized, parts.lora_params
    mode = recipe.quantization.mode
    dtype_bytes = DTYPE_BYTES[recipe.model.dtype]
    quantized_params = sum(m.weight.numel() for m in quantized.values())
    if mode == "none":
        weights, constants = params * dtype_bytes, 0
    else:
        # prepare_model_for_kbit_training keeps every unquantized parameter (embeddings, norms, head) in fp32
        rest = (params - quantized_params) * 4
        if mode == "4bit":
            weights = quantized_params // 2 + rest
            blocks = quantized_params // 64  # one absmax per 64 weights
            constants = blocks + blocks // 256 * 4 if recipe.quantization.double_quant else blocks * 4
        else:
            weights = quantized_params + rest
            constants = sum(m.out_features * 4 for m in quantized.values())  # one fp32 scale per row
    # adapter weight + gradient (bf16 under QLoRA, as TRL trains them; fp32 otherwise) + two fp32 Adam moments
    adapter_bytes = 2 + 2 if mode == "4bit" else 4 + 4
    tokens = recipe.train.batch_size * recipe.data.max_length
    act_bytes = 4 if recipe.model.dtype == "float32" else 2
    hidden = config.get_text_config().hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    per_layer = (8 * hidden + 5 * inner) * act_bytes  # saved tensors per token per layer (flash/SDPA attention)
    layers = config.get_text_config().num_hidden_layers
    if checkpointing:
        activations = tokens * (layers * hidden * act_bytes + per_layer)
    else:
        activations = tokens * layers * per_layer
    return {
        "weights": weights,
        "quant consts": constants,
        "LoRA + Adam": lora_params * (adapter_bytes + 8),
        "activations": activations,
        "logits": tokens * config.get_text_config().vocab_size * (act_bytes + 4 + 4),  # logits, fp32 copy, grad
    }


def _tokens(recipe: Recipe, source: str, tokens: int | None) -> tuple[int | None, str]:
    train, data = recipe.train, recipe.data
    if tokens is not None:
        return tokens, "given"
    if train.max_steps:
        step_tokens = train.max_steps * train.batch_size * train.gradient_accumulation * data.max_length
        return step_tokens, f"{train.max_steps} steps of full packed rows"
    if data.path in KNOWN_DATA:
        known = KNOWN_DATA[data.path]
        total = int(known["rows"] * known["tokens_per_row"] * train.epochs)
        return total, f"{train.epochs:g} epoch(s) of {known['rows']:,} rows x {known['tokens_per_row']} tokens"
    if data.path == BUILTIN_DEMO or is_local(data.path):
        from ..data.prepare import prepare_data
        from ..model.tokenizer import load_tokenizer

        counted = prepare_data(recipe, load_tokenizer(recipe.model, source), source).train_tokens
        return int(counted * train.epochs), f"{train.epochs:g} epoch(s), counted"
    return None, "pass --tokens N for a hub data set lora-tune does not know"
