"""One base model in memory, many LoRA adapters, switched per call with peft's multi-adapter machinery."""
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel

from ..config.schema import ModelSection, QuantizationSection
from ..errors import about, fail
from ..model.loading import load_base
from ..model.lora import check_adapter
from ..model.tokenizer import load_tokenizer
from ..run_folder import RunFolder
from .compat import adapter_folder, check_name
from .prompting import TrainingPrompt, training_prompt

BASE_ROW = "__base__"  # peft's name for "no adapter" in per-row adapter_names


class AdapterPool:
    """Adapters are read from disk when added; at most `max_loaded` stay resident (least recently used evicted
    and re-read on demand). All model calls hold one lock, so concurrent callers never see another's adapter.

    Generation puts each instruction in the prompt format its adapter was trained with. Rows for the bare base
    (adapter None) use the pool's format: the run's when the pool is built on a run folder, else the first added
    adapter's, so base and adapter answers to the same instruction are comparable."""

    def __init__(self, base: str, quantization: str = "none", dtype: str = "float32", max_loaded: int = 8,
                 tokenizer: str | None = None):
        """Load the base once; adapters are added by name.

        Args:
            base: a run folder (its pinned base, quantization, dtype and tokenizer) or a base model folder or hub id.
            quantization: for a base given directly: none, 8bit or 4bit.
            dtype: for a base given directly: the weights' dtype.
            max_loaded: adapters kept in memory; the least recently used is re-read from disk when asked for.
            tokenizer: a tokenizer folder other than the base's (or the run's).

        Example:
            pool = AdapterPool("adapters/support-run")
            pool.add("legal", "adapters/legal-run")
            pool.generate("Summarise ...", adapter="legal")
        """
        with about(base):
            section, quant, run = _base_of(base, quantization, dtype, tokenizer)
            self.base_id = section.name_or_path
            _check_memory(section, quant)
            self.tokenizer = load_tokenizer(section)
            self.tokenizer.padding_side = "left"  # generation appends on the right
            self.model = load_base(section, quant, section.name_or_path).eval()
        self.max_loaded = max_loaded
        self.paths: dict[str, Path] = {}
        self.prompts: dict[str, TrainingPrompt] = {}
        self.base_prompt = training_prompt(run, self.tokenizer)
        self.resident: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        self.lock = threading.RLock()

    def add(self, name: str, path: str | Path) -> None:
        check_name(name)
        folder = adapter_folder(path)
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        check_adapter(folder, base, self.base_id)  # the whole adapter, before its name is visible anywhere
        prompt = training_prompt(RunFolder(folder), self.tokenizer)
        with self.lock:
            if name in self.resident:
                self._unload(name)
            self._load(name, folder)  # on failure nothing of it remains (see _load)
            self.paths[name], self.prompts[name] = folder, prompt
            if self.base_prompt.ids is None:  # the base is prompted like the first adapter of known format
                self.base_prompt = prompt

    def remove(self, name: str) -> None:
        with self.lock:
            self._known(name)
            if name in self.resident:
                self._unload(name)
            del self.paths[name], self.prompts[name]

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    @contextmanager
    def use(self, name: str | None):
        """Plain model calls inside the block run with this adapter (None: the bare base)."""
        with self.lock:
            if name is None:
                if isinstance(self.model, PeftModel):
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
                return
            self._ensure_loaded(name)
            self.model.set_adapter(name)
            yield self.model

    def prompt_ids(self, text: str, adapter: str | None, template: bool = True) -> list[int]:
        """The token ids generation starts from: the instruction in the adapter's training prompt (see the class)."""
        render = self._prompt(adapter).ids if template else None
        return render(text) if render else self.tokenizer(text)["input_ids"]

    def chat_ids(self, messages: list[dict], adapter: str | None) -> list[int]:
        """A conversation's token ids, rendered by the chat template the adapter's exports carry (so the same messages
        give the same prompt here, in transformers pipelines, Ollama and llama.cpp) and tokenized as training did.
        Raises jinja2's TemplateError for messages that template refuses."""
        template = self._prompt(adapter).chat_template or self.tokenizer.chat_template
        if template is None:
            raise fail("chat", f"{adapter or 'the base'} has no chat template",
                       "send the prompt as plain text (completions)", source="AdapterPool")
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: str | list[str], adapter: str | None | list[str | None] = None,
                 max_new_tokens: int = 64, template: bool = True, **generate_kwargs) -> str | list[str]:
        """Greedy by default. One adapter for all prompts, or one per prompt (a single mixed batch)."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise fail("adapter", f"{len(adapters)} adapters for {len(prompts)} prompts",
                       "give one adapter per prompt, or a single one for all", source="generate")
        ids = [self.prompt_ids(p, a, template) for p, a in zip(prompts, adapters)]
        decoded = self.generate_from_ids(ids, adapters, max_new_tokens, **generate_kwargs)
        return decoded[0] if single else decoded

    @torch.no_grad()
    def generate_from_ids(self, ids: list[list[int]], adapters: list[str | None], max_new_tokens: int = 64,
                          **generate_kwargs) -> list[str]:
        """Generation from prompts already tokenized, one adapter (or None) per row."""
        generate_kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
        with self.lock:
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.model.device)
            if len(set(adapters)) == 1:
                with self.use(adapters[0]) as model:
                    out = model.generate(**batch, **generate_kwargs, pad_token_id=self.tokenizer.pad_token_id)
            else:
                needed = {a for a in adapters if a is not None}
                if len(needed) > self.max_loaded:
                    raise fail("adapter", f"{len(needed)} adapters in one batch, max_loaded is "
                               f"{self.max_loaded}", "raise max_loaded or split the batch", source="generate")
                for name in needed:
                    self._ensure_loaded(name)
                with _hooks_removed_after(self.model):
                    out = self.model.generate(**batch, **generate_kwargs, pad_token_id=self.tokenizer.pad_token_id,
                                              adapter_names=[a or BASE_ROW for a in adapters])
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def _prompt(self, adapter: str | None) -> TrainingPrompt:
        return self.prompts[self._known(adapter)] if adapter is not None else self.base_prompt

    def _known(self, name: str | None) -> str | None:
        if name is not None and name not in self.paths:
            raise fail("adapter", f"{name!r} was never added (known: {sorted(self.paths)})",
                       "call pool.add(name, path) first", source="AdapterPool")
        return name

    def _ensure_loaded(self, name: str) -> None:
        self._known(name)
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        self._load(name, self.paths[name])

    def _load(self, name: str, path: Path) -> None:
        """peft loads it; if that fails half-way, what it added is deleted again, so nothing of it remains."""
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
        except Exception as exc:
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise fail("adapter", f"peft could not load it ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                       "check that it was saved by peft for this base", source=str(path)) from None
        self.resident[name] = None
        while len(self.resident) > self.max_loaded:  # evict after loading: peft keeps at least one adapter
            self._unload(next(iter(self.resident)))

    def _unload(self, name: str) -> None:
        self.model.delete_adapter(name)
        del self.resident[name]


@contextmanager
def _hooks_removed_after(model: torch.nn.Module):
    """peft attaches per-row adapter_names hooks to every LoRA layer and removes them only when generate returns
    (peft 0.21: _enable_peft_forward_hooks has no try/finally), so one failed mixed batch (NaN logits when sampling,
    out of memory) left them in place and every later call failed. Whatever hooks the block adds are removed on
    every exit path."""
    modules = list(model.modules())
    before = [set(module._forward_pre_hooks) for module in modules]
    try:
        yield
    finally:
        for module, known in zip(modules, before):
            for key in set(module._forward_pre_hooks) - known:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def _base_of(base: str, quantization: str, dtype: str, tokenizer: str | None):
    """(model section, quantization section, run folder) of the pool's base: a run folder's, or the one given."""
    run = RunFolder(base)
    if run.is_run:  # a run folder: its base, quantization, dtype and tokenizer
        recipe = run.recipe()
        section = recipe.model.model_copy(update={
            "name_or_path": run.base_model(), "init": "pretrained", "tokenizer": tokenizer or base})
        return section, recipe.quantization, run
    section = ModelSection(name_or_path=base, dtype=dtype, tokenizer=tokenizer)
    return section, QuantizationSection(mode=quantization, compute_dtype=dtype), run


def _check_memory(section: ModelSection, quantization: QuantizationSection) -> None:
    """The base in memory, refused up front when it would not fit (plan/memory.py); a hub id is not measured."""
    from ..plan import memory

    folder = Path(section.name_or_path)
    if not (folder / "config.json").is_file():
        return
    bytes_per_weight = memory.BYTES_PER_WEIGHT.get(quantization.mode, 4 if section.dtype == "float32" else 2)
    need = memory.for_loaded_model(memory.Shape.of_folder(folder), bytes_per_weight,
                                   f"the base {folder.name!r} in memory")
    memory.require(need, "memory", "load it 4-bit (quantization.mode: 4bit) or on a machine with more memory")
