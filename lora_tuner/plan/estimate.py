"""`lora-tune plan`: memory breakdown and time estimate from the config, the recipe and the data, no weights.

Time per token is matmul work at the device's calibrated share of peak, plus the vocabulary softmax (memory-bound,
so counted per logit, not per FLOP). A run computes the LM head on response tokens only (train.response_loss), so
the head's work and the softmax scale with the data's response share.

Preference methods (train.method dpo, kto) train on every sequence of a row (a DPO pair is two: prompt + chosen,
prompt + rejected) and add forward passes without gradients: the reference's, and KTO's KL estimate (policy and
reference on mismatched completions). TRL computes their log-probabilities in chunks, so the head holds no full
logits."""
from dataclasses import dataclass, replace

import torch
from transformers import AutoConfig, PretrainedConfig

from ..config.schema import Recipe
from ..data.reading import is_local
from ..errors import about, fail
from ..model.anatomy import meta_model, quantized_linears
from ..model.dtypes import native_dtype
from ..model.response_loss import CHUNK_ELEMENTS
from ..verify import ROWS
from .devices import GIB, Device, device
from .known_configs import KNOWN, KNOWN_DATA

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_RESPONSE_SHARE = 0.5  # when the data cannot be counted
# train.method -> (sequences trained per row, forward passes without gradient per sequence, what they are)
METHOD_PASSES = {"sft": (1, 0, ""),
                 "dpo": (2, 1, "two sequences per pair (prompt + chosen, prompt + rejected), each trained and run "
                               "once more through the reference (no gradient)"),
                 "kto": (1, 3, "each row trained and run once more through the reference, plus policy and reference "
                               "on a mismatched completion for KTO's KL estimate (no gradient)")}


def usable_memory(total_bytes: int) -> int:
    """The memory budget both `plan` and `run` decide against: ~10% of a GPU goes to the CUDA context, kernels'
    workspaces and fragmentation."""
    return int(0.9 * total_bytes)


@dataclass
class Anatomy:
    config: PretrainedConfig
    params: int
    quantized: dict  # name -> Linear that bitsandbytes replaces when the base is loaded in 4 or 8 bits
    body_matmul_params: int  # every linear layer but the output head
    head_params: int
    lora_params: int
    largest_tensor: int  # elements of the model's largest weight (what streamed merge and export hold at once)


@dataclass
class DataShape:
    tokens: int | None  # tokens the run trains on (all epochs)
    note: str
    response_share: float  # trained (response) tokens / all tokens
    tokens_per_row: float


@dataclass
class Plan:
    device: Device
    dtype: str
    world_size: int
    parts: Anatomy
    data: DataShape
    memory: dict[str, int]  # bytes per component, per device
    checkpointing: bool
    batch_size: int
    response_loss: bool
    quantization: str  # none, 4bit, 8bit
    method: str  # train.method
    change_to_fit: str | None = None  # when it does not fit: the first change that makes it

    @property
    def params(self) -> int:
        return self.parts.params

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def lora_params(self) -> int:
        return self.parts.lora_params

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def budget(self) -> int:
        return usable_memory(self.device.memory_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget

    @property
    def head_share(self) -> float:
        """Share of tokens the LM head and softmax run on."""
        return self.data.response_share if self.response_loss and self.method == "sft" else 1.0

    @property
    def flops_per_token(self) -> float:
        passes = 3 if self.checkpointing else 2  # forward and input-gradient backward (frozen base), + a recompute
        passes += METHOD_PASSES[self.method][1]  # preference methods: the reference's forward (and KTO's KL)
        config = self.parts.config.get_text_config()
        context = self.data.tokens_per_row / 2  # causal attention over the example's own tokens, on average
        attention = 2 * 2 * config.num_hidden_layers * config.hidden_size * context
        matmuls = self.parts.body_matmul_params + self.parts.lora_params + self.parts.head_params * self.head_share
        return passes * (2 * matmuls + attention)

    @property
    def seconds_per_token(self) -> float:
        compute = self.flops_per_token / (self.device.tflops(self.dtype) * 1e12 * self.device.efficiency)
        vocab = self.parts.config.get_text_config().vocab_size
        return compute + self.head_share * vocab * self.device.softmax_ns * 1e-9

    @property
    def seconds(self) -> float | None:
        return None if self.data.tokens is None else self.data.tokens * self.seconds_per_token

    def after_training(self) -> list:
        """What merge, export and serving the result need here (plan/memory.py), by their defaults."""
        from . import memory

        config = self.parts.config.get_text_config().to_dict()
        shape = memory.Shape.of_config(config, self.params, self.parts.largest_tensor)
        weight_bytes = memory.BYTES_PER_WEIGHT.get(self.quantization, DTYPE_BYTES[self.dtype])
        return [memory.for_merge(shape, self.lora_params, ROWS, self.quantization == "4bit"),
                memory.for_gguf_export(shape, "q8_0", ROWS),
                memory.for_loaded_model(shape, weight_bytes, "serve, generate, eval")]

    def lines(self) -> list[str]:
        quantized = sum(m.weight.numel() for m in self.parts.quantized.values()) if self.quantized else 0
        rows = [f"parameters      {_count(self.params):>10s}  ({_count(quantized)} quantized, "
                f"LoRA {_count(self.lora_params)} trainable)"]
        rows += [f"{name:15s} {size / GIB:8.2f} GiB" for name, size in self.memory.items()]
        rows.append(f"{'batch':15s} {self.batch_size:>8d} rows, gradient checkpointing "
                    f"{'on' if self.checkpointing else 'off'}, {self.dtype}")
        if self.method != "sft":
            rows.append(f"{'method':15s} {self.method}: {METHOD_PASSES[self.method][2]}")
        verdict = "fits" if self.fits else "does NOT fit"
        where = f"{self.device.name}'s" if self.world_size == 1 else f"each of {self.world_size} {self.device.name}s'"
        rows.append(f"{'total':15s} {self.total_bytes / GIB:8.2f} GiB  -> {verdict} in {where} "
                    f"{self.budget / GIB:.2f} GiB usable")
        if self.change_to_fit:
            rows.append(f"to fit          {self.change_to_fit}")
        if self.seconds is None:
            rows.append(f"time            unknown: {self.data.note}")
        else:
            calibrated = "calibrated" if self.device.calibrated else "assumed"
            rows.append(f"time            {self.seconds / 60:8.1f} min for {self.data.tokens / 1e6:.2f} M tokens "
                        f"({self.data.note}): {1 / self.seconds_per_token:,.0f} tokens/s at "
                        f"{self.device.efficiency:.0%} ({calibrated}) of {self.device.tflops(self.dtype):g} TFLOP/s")
        rows += ["", "after training, with their defaults (peak memory, estimated; merge and export stream on the CPU):"]
        return rows + ["  " + need.line() for need in self.after_training()]


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def anatomy(recipe: Recipe) -> Anatomy:
    config = model_config(recipe)
    model = meta_model(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    return Anatomy(
        config=config, params=sum(p.numel() for p in model.parameters()),
        quantized=quantized_linears(model),
        body_matmul_params=sum(m.weight.numel() for m in linears.values() if m is not head),
        head_params=head.weight.numel() if head is not None else 0,
        lora_params=sum(recipe.lora.rank * (m.in_features + m.out_features)
                        for m in lora_targets(recipe, linears, model).values()),
        largest_tensor=max(p.numel() for p in model.parameters()),
    )


def for_device(recipe: Recipe, target: Device) -> Recipe:
    """'auto' dtypes as `lora-tune run` resolves them there; a bf16 recipe on a GPU without bf16 is refused."""
    if target.name == "cpu":
        native = native_dtype()[0]
    else:
        native = "bfloat16" if target.bf16 else "float16"
        for field, value in (("model.dtype", recipe.model.dtype),
                             ("quantization.compute_dtype", recipe.quantization.compute_dtype)):
            if value == "bfloat16" and not target.bf16:
                raise fail(field, f"'bfloat16', which the {target.name} does not compute",
                           f"set {field}: auto (float16 there) or float16")
    dtype = native if recipe.model.dtype == "auto" else recipe.model.dtype
    compute = dtype if recipe.quantization.compute_dtype == "auto" else recipe.quantization.compute_dtype
    response = recipe.train.response_loss is not False
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"dtype": dtype}),
        "quantization": recipe.quantization.model_copy(update={"compute_dtype": compute}),
        "train": recipe.train.model_copy(update={"response_loss": response})})


def make_plan(recipe: Recipe, device_name: str, tokens: int | None = None, world_size: int = 1) -> Plan:
    """Per-device memory and wall time; with several GPUs, the recipe's distributed strategy says what is sharded."""
    with about(recipe.file):
        return _plan(recipe, device(device_name), tokens, world_size)


def _plan(recipe: Recipe, target: Device, tokens: int | None, world_size: int) -> Plan:
    parts = anatomy(recipe)
    recipe = for_device(recipe, target)
    budget = usable_memory(target.memory_bytes)
    recipe = fit_to_memory(recipe, parts, budget, world_size)  # as `lora-tune run` decides
    data = _data_shape(recipe, tokens)
    if world_size > 1 and data.tokens:
        data = replace(data, tokens=data.tokens // world_size,  # each device's share
                       note=data.note + f", split over {world_size} devices ({recipe.distributed.strategy})")
    plan = Plan(target, recipe.model.dtype, world_size, parts, data, _memory(recipe, parts, world_size),
                recipe.train.gradient_checkpointing, recipe.train.batch_size, recipe.train.response_loss,
                recipe.quantization.mode, recipe.train.method)
    if not plan.fits:
        plan.change_to_fit = change_to_fit(recipe, parts, budget, world_size)
    return plan


AUTO_BATCHES = (64, 32, 16, 8, 4, 2, 1)  # packed rows of data.max_length tokens
MIN_BATCH_WITHOUT_CHECKPOINTING = 4  # below this, recomputing activations costs less than tiny batches do


def fit_to_memory(recipe: Recipe, parts: Anatomy, budget: int, world_size: int = 1) -> Recipe:
    """Resolve train.batch_size and train.gradient_checkpointing when 'auto': the largest batch that fits the
    budget without checkpointing if that is at least a few rows, else the largest that fits with it."""
    train = recipe.train
    batches = AUTO_BATCHES if train.batch_size == "auto" else (train.batch_size,)
    choices = (False, True) if train.gradient_checkpointing == "auto" else (train.gradient_checkpointing,)
    for checkpointing in choices:
        for batch in batches:
            trial = _with_train(recipe, batch_size=batch, gradient_checkpointing=checkpointing)
            fits = sum(_memory(trial, parts, world_size).values()) <= budget
            enough = checkpointing or len(choices) == 1 or batch >= min(MIN_BATCH_WITHOUT_CHECKPOINTING, batches[0])
            if fits and enough:
                return trial
    # nothing fits: the smallest, most frugal setting, and `plan` will say it does not fit
    return _with_train(recipe, batch_size=batches[-1], gradient_checkpointing=choices[-1])


def change_to_fit(recipe: Recipe, parts: Anatomy, budget: int, world_size: int) -> str:
    """The usual remedies, cheapest first and each on top of the ones before, until the recipe fits: gradient
    checkpointing, a smaller batch, a 4-bit base, more GPUs sharing the weights (FSDP)."""
    def total(trial: Recipe, size: int = world_size) -> int:
        return sum(_memory(trial, parts, size).values())

    changes, trial = [], recipe
    if not trial.train.gradient_checkpointing:
        changes, trial = ["train.gradient_checkpointing: true"], _with_train(trial, gradient_checkpointing=True)
    for quantize in (False, True):
        if quantize:
            if trial.quantization.mode == "4bit":
                break
            changes = changes + ["quantization.mode: 4bit (QLoRA)"]
            trial = trial.model_copy(update={"quantization": trial.quantization.model_copy(update={"mode": "4bit"})})
        for batch in [trial.train.batch_size] + [b for b in AUTO_BATCHES if b < trial.train.batch_size]:
            candidate = _with_train(trial, batch_size=batch)
            if total(candidate) <= budget:
                smaller = [f"train.batch_size: {batch}"] if batch != recipe.train.batch_size else []
                return f"{', '.join(changes + smaller)} ({total(candidate) / GIB:.2f} GiB)"
    sharded = trial.model_copy(update={"distributed": trial.distributed.model_copy(update={"strategy": "fsdp"})})
    for size in (2, 4, 8, 16, 32, 64):
        if size > world_size and total(sharded, size) <= budget:
            return f"{', '.join(changes)}, {size} GPUs with distributed.strategy: fsdp " \
                   f"({total(sharded, size) / GIB:.2f} GiB each)"
    return "nothing lora-tune plans for: a smaller model or a larger device"


def _with_train(recipe: Recipe, **changes) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=changes)})


def model_config(recipe: Recipe) -> PretrainedConfig:
    model = recipe.model
    if model.init == "random":
        return AutoConfig.for_model(**model.config)
    if model.name_or_path in KNOWN:
        return AutoConfig.for_model(**KNOWN[model.name_or_path])
    try:  # a local folder, or a hub id already in the cache; never the network (offline, huggingface_hub retries
        # for ~25 s before it gives up, printing each retry)
        return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, local_files_only=True)
    except OSError:
        raise fail("model.name_or_path", f"no config.json for {model.name_or_path!r} on this machine",
                   "point it at a local model folder (only config.json is read)") from None


def lora_targets(recipe: Recipe, linears: dict, model) -> dict:
    """The linear layers peft wraps: all but the output head for all-linear, else names ending in a target."""
    if recipe.lora.target_modules == "all-linear":
        head = model.get_output_embeddings()
        return {n: m for n, m in linears.items() if m is not head}
    return {n: m for n, m in linears.items()
            if any(n == t or n.endswith("." + t) for t in recipe.lora.target_modules)}


SHARDED = {"ddp": (), "deepspeed-zero2": ("LoRA + Adam",), "fsdp": ("weights", "quant consts", "LoRA + Adam"),
           "deepspeed-zero3": ("weights", "quant consts", "LoRA + Adam")}


def _memory(recipe: Recipe, parts: Anatomy, world_size: int = 1) -> dict[str, int]:
    config, params, quantized, lora_params = parts.config.get_text_config(), parts.params, parts.quantized, \
        parts.lora_params
    mode, checkpointing = recipe.quantization.mode, recipe.train.gradient_checkpointing
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
    tokens = recipe.train.batch_size * recipe.data.max_length * METHOD_PASSES[recipe.train.method][0]
    act_bytes = 4 if recipe.model.dtype == "float32" else 2
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    per_layer = (8 * hidden + 5 * inner) * act_bytes  # saved tensors per token per layer (SDPA attention)
    if recipe.lora.dropout > 0:  # each LoRA module keeps its own dropped-out copy of its input
        per_layer += (6 * hidden + inner) * act_bytes
    activations = tokens * (layers * hidden * act_bytes + per_layer) if checkpointing else tokens * layers * per_layer
    if recipe.train.response_loss or recipe.train.method != "sft":  # a chunk of logits, and the head's input gradient
        head = CHUNK_ELEMENTS * 4 * 2 + tokens * hidden * 4
    else:  # logits, their fp32 copy and gradient, for every token
        head = tokens * config.vocab_size * (act_bytes + 4 + 4)
    memory = {"weights": weights, "quant consts": constants, "LoRA + Adam": lora_params * (adapter_bytes + 8),
              "activations": activations, "LM head + loss": head}
    if world_size > 1:
        sharded = SHARDED[recipe.distributed.strategy]
        memory = {name: size // world_size if name in sharded else size for name, size in memory.items()}
    return memory


def _data_shape(recipe: Recipe, tokens: int | None) -> DataShape:
    train, data = recipe.train, recipe.data
    known = KNOWN_DATA.get(data.path)
    share = known["response_share"] if known else DEFAULT_RESPONSE_SHARE
    per_row = known["tokens_per_row"] if known else data.max_length / 2
    if is_local(data.path):
        from ..data.prepare import prepare_data
        from ..model.tokenizer import load_tokenizer

        rows = prepare_data(recipe, load_tokenizer(recipe.model)).train
        sequences = [sequence for row in rows for sequence in row.tokens.sequences()]
        counted = sum(len(sequence) for sequence in sequences)
        share = sum(len(sequence.completion_ids) for sequence in sequences) / counted
        per_row = counted / len(sequences)
        if tokens is None and not train.max_steps:
            return DataShape(int(counted * train.epochs), f"{train.epochs:g} epoch(s), counted", share, per_row)
    if tokens is not None:
        return DataShape(tokens, "given", share, per_row)
    if train.max_steps and train.method != "sft":  # rows are padded, not packed: each sequence costs its own length
        sequences = METHOD_PASSES[train.method][0]
        step_tokens = int(train.max_steps * train.batch_size * train.gradient_accumulation * sequences * per_row)
        return DataShape(step_tokens, f"{train.max_steps} steps of {train.batch_size} rows x {sequences} sequence(s)",
                         share, per_row)
    if train.max_steps:
        step_tokens = train.max_steps * train.batch_size * train.gradient_accumulation * data.max_length
        return DataShape(step_tokens, f"{train.max_steps} steps of full packed rows", share, per_row)
    if known:
        total = int(known["rows"] * known["tokens_per_row"] * train.epochs)
        return DataShape(total, f"{train.epochs:g} epoch(s) of {known['rows']:,} rows x {known['tokens_per_row']} "
                         "tokens", share, per_row)
    return DataShape(None, "pass --tokens N for a hub data set lora-tune does not know", share, per_row)
