"""Verification streams every model a module at a time (lora_tuner/verify/streamed.py) and must give the numbers a
whole model in memory gives: the reference (base + adapter, float32), the base and the export, on tiny LLaMA (tied
and untied, GQA) and GPT-J shapes; the GGUF read-back likewise. And it must hold a few tensors, not the model."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import random_adapter, sharded_base
from lora_tuner import merge
from lora_tuner.export.lora_deltas import LoraDeltas
from lora_tuner.export.merged_weights import streamed_source
from lora_tuner.run_folder import RunFolder
from lora_tuner.verify.scoring import loss, reference_logits
from lora_tuner.verify import verdict
from lora_tuner.verify.verdict import verification_rows

pytestmark = pytest.mark.slow

SHAPES = {"llama-tied": ("llama", dict(tie_word_embeddings=True)),
          "llama-gqa": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)), "gptj": ("gptj", {})}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_streamed_verification_equals_whole_models(tmp_path, monkeypatch, shape):
    kind, config = SHAPES[shape]
    base = sharded_base(tmp_path / "base", kind, **config)
    peft_model = random_adapter(base, tmp_path / "adapter").eval()
    report = merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), dtype="fp16")
    rows = verification_rows(RunFolder(tmp_path / "adapter"), tmp_path / "out", base.config)
    assert rows.batches[0].position_ids is not None  # packed: both architectures keep examples apart

    streamed = streamed_source(tmp_path / "base", "reference",
                               deltas=LoraDeltas(tmp_path / "adapter")).model()
    assert next(streamed.parameters()).device.type == "meta"  # nothing held between calls
    for got, want in zip(reference_logits(streamed, rows.batches), reference_logits(peft_model, rows.batches)):
        assert relative(got, want) < 1e-5

    v = report.verification
    with peft_model.disable_adapter():
        base_loss = loss(peft_model, rows.batches)
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for found, whole in ((v.loss_adapter, loss(peft_model, rows.batches)), (v.loss_base, base_loss),
                         (v.loss_export, loss(export, rows.batches))):
        assert abs(found - whole) <= 1e-5 * abs(whole)
    assert v.passed and v.tokens == sum(len(b.targets) for b in rows.batches) > 0

    monkeypatch.setattr(verdict, "packs_apart", lambda config: False)  # the rows padded instead: same numbers
    padded = verification_rows(RunFolder(tmp_path / "adapter"), tmp_path / "out", base.config)
    assert padded.batches[0].position_ids is None
    assert abs(loss(peft_model, padded.batches) - v.loss_adapter) <= 1e-5 * v.loss_adapter


def test_a_tiny_gain_is_judged_by_what_rounding_costs_and_a_wrong_merge_still_fails(tmp_path):
    """An adapter that barely moved the loss: its fp16 export passes on the rounding rule. The same adapter merged at
    the wrong scale (its B doubled in the weights written) fails, whichever rule applies."""
    base = sharded_base(tmp_path / "base", "llama")
    random_adapter(base, tmp_path / "adapter", init_lora_weights=False)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter/adapter_model.safetensors")
    small = {k: v * 0.05 if ".lora_B." in k else v for k, v in weights.items()}
    save_file(small, tmp_path / "adapter/adapter_model.safetensors")
    v = merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), dtype="fp16").verification
    assert v.passed and v.loss_rule == "rounding", v.why
    assert abs(v.loss_export - v.loss_adapter) <= 0.005

    large = {k: v * 40 if ".lora_B." in k else v for k, v in small.items()}  # a clear gain or loss now
    save_file(large, tmp_path / "adapter/adapter_model.safetensors")
    good = merge(tmp_path / "adapter", tmp_path / "good", base=str(tmp_path / "base")).verification
    assert good.passed
    doubled = {k: v * 2 if ".lora_B." in k else v for k, v in large.items()}
    save_file(doubled, tmp_path / "adapter/adapter_model.safetensors")
    merge(tmp_path / "adapter", tmp_path / "wrong", base=str(tmp_path / "base"), verify=False)
    save_file(large, tmp_path / "adapter/adapter_model.safetensors")  # verified against the real adapter
    from lora_tuner.verify.verdict import verify_merge

    reference = streamed_source(tmp_path / "base", "ref", deltas=LoraDeltas(tmp_path / "adapter"))
    wrong = verify_merge(streamed_source(tmp_path / "wrong", "export"), reference,
                         streamed_source(tmp_path / "base", "base"),
                         verification_rows(RunFolder(tmp_path / "adapter"), tmp_path / "out", base.config))
    assert not wrong.passed, wrong.why


def test_verification_holds_a_few_tensors_not_the_model(tmp_path):
    """The verified merge of a ~170 MB float32 model grows peak memory by well under half of it: each module's weights
    are read when it runs and freed after. Holding any one of the three models it scores (the adapter's reference, the
    base, the export) would grow it by the whole model; what it holds instead is a few tensors, one batch's
    activations and the reference's logits (measured 26-47 MB on three CPU kinds; a 690 MB model, 24 layers: 26 MB)."""
    base = sharded_base(tmp_path / "base", "llama", shard="20MB", hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
    random_adapter(base, tmp_path / "adapter", r=4)
    model_mb = sum(p.numel() for p in base.parameters()) * 4 / 1e6
    # Anonymous memory (what holding a model costs), sampled every millisecond: the weights are read through mapped
    # files, whose resident pages count in VmRSS/VmHWM as page cache the kernel may keep or drop (17-48 MB of
    # run-to-run spread in VmHWM here), so VmHWM does not measure what the process holds.
    script = textwrap.dedent(f"""
        import re, threading, time
        from lora_tuner import merge
        def anon():
            return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1e3
        peak, done = [0.0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        def run(out):
            return merge({str(tmp_path / 'adapter')!r}, out, base={str(tmp_path / 'base')!r}, shard_size="20MB")
        run({str(tmp_path / 'warm-up')!r})  # first use pages in library code; that is not the verification's data
        before = anon()
        sampler = threading.Thread(target=sample)
        sampler.start()
        assert run({str(tmp_path / 'out')!r}).verification.passed
        done.set()
        sampler.join()
        print(peak[0] - before)
    """)
    # glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, which RSS would count: blocks of
    # 64 KB and more are mapped and returned when freed, so the peak is what the process held
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = float(re.findall(r"[\d.]+", done.stdout.strip().splitlines()[-1])[0])
    print(f"model {model_mb:.0f} MB in float32; verified merge peak anonymous memory growth {peak_mb:.0f} MB")
    assert model_mb > 150 and peak_mb < model_mb / 2


def test_the_memory_budget_decides_before_anything_is_written(tmp_path, monkeypatch):
    """With a budget between what a merge needs without verification and with it (plan/memory.py's estimates),
    the verified merge is refused with its fix and writes nothing; the same merge with --no-verify runs."""
    from lora_tuner.errors import UserError
    from lora_tuner.plan import memory
    from lora_tuner.verify.verdict import ROWS

    base = sharded_base(tmp_path / "base", "llama")
    random_adapter(base, tmp_path / "adapter")
    shape = memory.Shape.of_folder(tmp_path / "base")
    lora = LoraDeltas(tmp_path / "adapter").params
    plain, verified = memory.for_merge(shape, lora, None, False).total, memory.for_merge(shape, lora, ROWS, False).total
    assert plain < verified
    monkeypatch.setenv("LORA_TUNE_MEMORY", str((plain + verified) // 2))
    with pytest.raises(UserError, match="merge with verification needs about .* pass --no-verify"):
        merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), verify=False).verification is None
