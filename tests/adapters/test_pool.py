"""AdapterPool: swapping adapters gives exactly what a freshly loaded adapter gives, per call and per row."""
import threading

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

from helpers import make_adapter, poison, recipe_dict, write_recipe
from lora_tuner import AdapterPool, UserError, load_recipe, run
from lora_tuner.cli import main
from lora_tuner.formats.templates import ALPACA, render
from lora_tuner.model.loading import load_base

pytestmark = pytest.mark.slow  # trains or merges models: the full tier

IDS = torch.tensor([[1, 70, 80, 90, 100, 110, 120, 130]])
PROMPT = "Reverse the word: apple"


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def fresh(base_folder, adapter=None, quantization="none"):
    from lora_tuner.config.schema import ModelSection, QuantizationSection

    section = ModelSection(name_or_path=base_folder, dtype="float32")
    model = load_base(section, QuantizationSection(mode=quantization, compute_dtype="float32"), base_folder)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def greedy(model, tokenizer, text):
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture
def adapters(tmp_path, tiny_base):
    base = tiny_base("llama")
    return base, make_adapter(base, tmp_path / "a", 1), make_adapter(base, tmp_path / "b", 2, r=4)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_swapped_adapter_equals_freshly_loaded(adapters, quantization):
    base, a, b = adapters
    pool = AdapterPool(base, quantization=quantization)
    pool.add("a", a)
    pool.add("b", b)
    for name in ("a", "b", "a"):  # A -> B -> A
        with pool.use(name) as model:
            got = logits(model)
    reference = fresh(base, a, quantization)
    assert (got - logits(reference)).abs().max() <= 1e-6
    pooled = pool.generate(PROMPT, adapter="a", template=False, max_new_tokens=12)
    assert pooled == greedy(reference, pool.tokenizer, PROMPT)
    with pool.use("b") as model:
        assert (logits(model) - logits(fresh(base, b, quantization))).abs().max() <= 1e-6
    with pool.use(None) as model:
        assert torch.equal(logits(model), logits(fresh(base, quantization=quantization)))
    assert pool.generate(PROMPT, adapter="a", template=False) != pool.generate(PROMPT, adapter="b", template=False)


def test_mixed_batch_equals_rows_one_by_one(adapters):
    base, a, b = adapters
    pool = AdapterPool(base)
    pool.add("a", a)
    pool.add("b", b)
    prompts = [PROMPT, "Add 2 and 3", "Sort: pear"]
    mixed = pool.generate(prompts, adapter=["a", "b", None], template=False)
    one_by_one = [pool.generate(p, adapter=n, template=False) for p, n in zip(prompts, ["a", "b", None])]
    assert mixed == one_by_one


def test_many_swaps_and_evictions_keep_the_model_its_size(tmp_path, adapters):
    """Every use evicts the least recently used adapter and re-reads another from disk (3 adapters, 2 resident): after
    150 of them the model holds exactly the parameters it held, and a re-read adapter is exact."""
    base, a, _ = adapters
    b, c = make_adapter(base, tmp_path / "b8", 4), make_adapter(base, tmp_path / "c", 3)  # all of rank 8
    pool = AdapterPool(base, max_loaded=2)
    for name, path in (("a", a), ("b", b), ("c", c)):
        pool.add(name, path)
    count = sum(p.numel() for p in pool.model.parameters())
    for i in range(150):
        with pool.use("abc"[i % 3]):
            pass
    assert sum(p.numel() for p in pool.model.parameters()) == count
    assert len(pool.resident) == 2
    with pool.use("a") as model:  # evicted many times, re-read from disk: still exact
        assert (logits(model) - logits(fresh(base, a))).abs().max() <= 1e-6


def test_threads_each_get_their_own_adapter(adapters):
    base, a, b = adapters
    pool = AdapterPool(base)
    pool.add("a", a)
    pool.add("b", b)
    expected = {n: pool.generate(PROMPT, adapter=n, template=False) for n in ("a", "b")}
    results, errors = {"a": [], "b": []}, []

    def worker(name):
        try:
            for _ in range(10):
                results[name].append(pool.generate(PROMPT, adapter=name, template=False))
        except Exception as exc:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {n: [expected[n]] * 10 for n in ("a", "b")}


def test_gptj_adapter_on_llama_base_is_refused(tmp_path, tiny_base):
    gptj_adapter = make_adapter(tiny_base("gptj"), tmp_path / "gptj", 1)
    pool = AdapterPool(tiny_base("llama"))
    with pytest.raises(UserError) as error:
        pool.add("j", gptj_adapter)
    assert str(error.value) == (f"{gptj_adapter}: adapter: targets 'transformer.h.0.attn.k_proj.weight', which base "
                                f"{tiny_base('llama')!r} does not have; this adapter belongs to another model; "
                                "use the base it was trained on")
    with pytest.raises(UserError, match="not a plain identifier"):
        pool.add("../x", gptj_adapter)


def test_run_folder_prompt_template_is_applied(tmp_path, tiny_base, alpaca_file):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(tiny_base("llama"), alpaca_file,
                                                            train={"max_steps": 2})))
    folder = run(recipe, output=str(tmp_path / "run")).folder
    pool = AdapterPool(str(folder))  # base, quantization and tokenizer from the run
    pool.add("tasks", folder)
    templated = pool.generate(PROMPT, adapter="tasks")
    assert templated == pool.generate(render(ALPACA, PROMPT, ""), adapter="tasks", template=False)

    cli = CliRunner().invoke(main, ["generate", "--adapter", str(folder), "--prompt", PROMPT])
    assert cli.exit_code == 0, cli.output
    assert f"[run] {templated}" in cli.output

    chat = CliRunner().invoke(main, ["chat", "--adapter", str(folder), "--max-new-tokens", "64"],
                              input=f"{PROMPT}\n/adapter nope\n/adapter none\n{PROMPT}\n/quit\n")
    assert chat.exit_code == 0, chat.output
    assert templated in chat.output and "no adapter 'nope'" in chat.output and "base> " in chat.output
    assert pool.generate(PROMPT, adapter=None) in chat.output


def test_a_failed_mixed_batch_leaves_no_hooks_and_the_pool_serves_on(adapters):
    """Sampling from NaN logits fails inside peft's per-row generate; its adapter hooks must not stay on the model
    (peft removes them only on success), or every later call fails with 'Length of adapter_names'."""
    base, a, b = adapters
    pool = AdapterPool(base)
    pool.add("a", a)
    pool.add("b", b)
    clean = pool.generate([PROMPT, PROMPT], adapter=["a", None], template=False)
    poison(pool, "b")
    with pytest.raises(RuntimeError):
        pool.generate([PROMPT, PROMPT], adapter=["a", "b"], template=False, do_sample=True, temperature=0.7)
    assert pool.generate([PROMPT, PROMPT], adapter=["a", None], template=False) == clean
    assert pool.generate(PROMPT, adapter=None, template=False) == clean[1]


def adapter_edited(base, folder, edit) -> str:
    import json

    from safetensors.torch import load_file, save_file

    make_adapter(base, folder, 5)
    config, tensors = json.loads((folder / "adapter_config.json").read_text()), load_file(
        folder / "adapter_model.safetensors")
    edit(config, tensors)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    return str(folder)


def first(tensors, kind):
    return next(name for name in tensors if kind in name)


BROKEN = {  # id -> (edit of config and tensors, words the one line must hold)
    "r-differs-from-tensors": (lambda c, t: c.update(r=4), ["r is 4", "rank 8"]),
    "r-not-a-number": (lambda c, t: c.update(r="sixteen"), ["'sixteen'", "positive whole number"]),
    "nan-weights": (lambda c, t: t[first(t, "lora_B")].fill_(float("nan")), ["NaN or infinite"]),
    "dora": (lambda c, t: c.update(use_dora=True), ["use_dora"]),
    "no-lora-keys": (lambda c, t: [t.pop(k) for k in list(t)] and t.update(x=torch.zeros(2)), ["no LoRA weights"]),
    "embedding-weights": (lambda c, t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                                 torch.zeros(8, 288)}), ["not a LoRA weight"]),
    "b-of-another-rank": (lambda c, t: t.update({first(t, "lora_B"): torch.zeros(t[first(t, "lora_B")].shape[0], 3)}),
                          ["not one low-rank pair"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_adapter_is_refused_whole_and_leaves_nothing(tmp_path, adapters, case):
    base, a, _ = adapters
    pool = AdapterPool(base)
    pool.add("a", a)
    edit, words = BROKEN[case]
    with pytest.raises(UserError) as error:
        pool.add("broken", adapter_edited(base, tmp_path / "broken", edit))
    assert all(word in str(error.value) for word in words), str(error.value)
    assert pool.names == ["a"] and set(pool.model.peft_config) == {"a"}
    alone = greedy(fresh(base, a), pool.tokenizer, PROMPT)
    assert pool.generate(PROMPT, adapter="a", template=False, max_new_tokens=12) == alone
