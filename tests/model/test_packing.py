"""Packing never lets one example see another: per-example losses in a packed row equal those run alone."""
import pytest
import torch
import torch.nn.functional as F

from helpers import make_trainer, recipe_dict, write_recipe
from lora_tuner import load_recipe
from lora_tuner.data.prepare import prepare_data
from lora_tuner.model.loading import load_base
from lora_tuner.model.lora import attach_lora
from lora_tuner.model.packing_check import packing_leak
from lora_tuner.model.tokenizer import load_tokenizer


def token_losses(logits, labels):
    """Per-token next-token losses for one example (labels already -100 where not trained)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")[labels[1:] != -100]


@pytest.mark.parametrize("kind", ["llama", "gptj"])
def test_packed_losses_equal_one_by_one(tmp_path, tiny_base, alpaca_file, kind):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(tiny_base(kind), alpaca_file,
                                                            data={"max_length": 512, "validation_size": 0})))
    tokenizer = load_tokenizer(recipe.model)
    model = attach_lora(load_base(recipe.model, recipe.quantization, recipe.model.name_or_path), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepare_data(recipe, tokenizer), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    assert len(starts) > 4  # several examples share the row

    model.eval()
    with torch.no_grad():
        packed = model(**batch)
        per_example, counts = [], []
        for start, end in zip(starts, starts[1:]):
            ids, labels = batch["input_ids"][0, start:end], batch["labels"][0, start:end].clone()
            labels[0] = -100  # as the collator does at every boundary
            alone = token_losses(model(input_ids=ids[None]).logits[0], labels)
            inside = token_losses(packed.logits[0, start:end], labels)
            assert torch.allclose(alone, inside, atol=1e-4), (alone - inside).abs().max()
            per_example.append(alone.sum())
            counts.append(len(alone))
    # the trainer's loss on the packed batch is the token mean over the examples: nothing crosses a boundary
    assert torch.isclose(packed.loss, torch.stack(per_example).sum() / sum(counts), atol=1e-5)
    # negative control: the same row without restarting position ids lets examples see each other, and the
    # comparison above notices (so its passing means something)
    start, end = starts[1], starts[2]
    labels = batch["labels"][0, start:end].clone()
    labels[0] = -100
    with torch.no_grad():
        leaking = model(input_ids=batch["input_ids"][:, :end]).logits[0, start:end]  # positions run on from 0
        alone = token_losses(model(input_ids=batch["input_ids"][0, start:end][None]).logits[0], labels)
    assert not torch.allclose(alone, token_losses(leaking, labels), atol=1e-2)


def test_packing_check_sees_isolation(tiny_base):
    from lora_tuner.config.schema import ModelSection, QuantizationSection

    for kind in ("llama", "gptj"):
        for attention in ("eager", "auto"):
            section = ModelSection(name_or_path=tiny_base(kind), dtype="float32", attn_implementation=attention)
            assert packing_leak(load_base(section, QuantizationSection(), section.name_or_path), 259) < 1e-4


def test_packed_attention_computes_each_example_alone(tiny_base):
    """auto picks the per-example packed SDPA, whose packed logits are those of each example run alone, exactly."""
    from lora_tuner.config.schema import ModelSection, QuantizationSection

    section = ModelSection(name_or_path=tiny_base("llama"), dtype="float32")
    model = load_base(section, QuantizationSection(), section.name_or_path)
    assert model.config._attn_implementation == "packed_sdpa"
    lengths = [5, 17, 9, 30]
    ids = torch.randint(3, 259, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(input_ids=ids[:, s:s + n]).logits for s, n in zip(starts, lengths)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()


def test_packed_spans_include_a_collators_padding():
    from lora_tuner.model.packed_attention import _spans

    rows = torch.cat([torch.arange(4), torch.arange(3), torch.zeros(3, dtype=torch.long)])
    assert _spans(rows, 10) == [(0, 4), (4, 7), (7, 10)]  # the padding is one span, not three
    assert _spans(torch.cat([torch.arange(4), torch.arange(3)]), 7) == [(0, 4), (4, 7)]
    assert _spans(torch.tensor([0, 1, 3, 0, 1]), 5) is None  # not a packed row: left to transformers' SDPA


def test_short_span_attention_computes_what_sdpa_computes():
    """The CPU path for short packed spans: in float32 SDPA's outputs and gradients to 1e-5; in bfloat16 within the
    dtype's rounding of the float32 result (at most 2.5x the fused kernel's own error, measured 1.6x)."""
    from lora_tuner.model.short_attention import MAX_SPAN, causal_attention, takes

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 3, 70, 16, generator=generator) * 2 for _ in range(3)]
    grad = torch.randn(1, 3, 70, 16, generator=generator)

    def run(attention, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
        out = attention(*leaves)
        out.backward(grad.to(dtype))
        return [t.detach().float() for t in [out] + [x.grad for x in leaves]]

    def errors(found, want):
        return [float((f - w).abs().max() / w.abs().max()) for f, w in zip(found, want)]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)

    def ours(q, k, v):
        return causal_attention(q, k, v, 0.3)

    want = run(sdpa, torch.float32)
    assert max(errors(run(ours, torch.float32), want)) <= 1e-5
    fused = errors(run(sdpa, torch.bfloat16), want)
    assert all(e <= 2.5 * max(f, 2 ** -8) for e, f in zip(errors(run(ours, torch.bfloat16), want), fused))

    def span(length, dtype=torch.bfloat16):
        return torch.zeros(1, 1, length, 1, dtype=dtype)

    assert takes(span(MAX_SPAN)) and not takes(span(MAX_SPAN + 1)) and not takes(span(16, torch.float32))  # fp32: fused
