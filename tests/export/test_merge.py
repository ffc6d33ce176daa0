"""Merge and export: merged weights behave like base + adapter, stream shard by shard, load without peft."""
import importlib
import json
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import random_adapter, recipe_dict, sharded_base, write_recipe
from lora_tuner import load_recipe, merge, run
from lora_tuner.cli import main
from lora_tuner.export.safetensors.streaming import CHUNK_BYTES
from lora_tuner.model.loading import load_base
from lora_tuner.run_folder import RunFolder

pytestmark = pytest.mark.slow  # trains or merges models: the full tier

IDS = torch.tensor([[1, 70, 80, 90, 100, 110, 120, 130, 140, 150]])


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


@pytest.mark.parametrize("kind", ["llama", "gptj"])
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_logits_equal_adapter_logits(tmp_path, kind, rslora):
    base = sharded_base(tmp_path / "base", kind)
    assert len(list((tmp_path / "base").glob("*.safetensors"))) >= 3  # several shards
    expected = logits(random_adapter(base, tmp_path / "adapter", use_rslora=rslora))
    report = merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), shard_size="300KB")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (logits(merged) - expected).abs().max() < 1e-4
    assert report.verification.passed and report.verification.max_abs_logit_diff < 1e-4
    assert report.dtype == "float32"  # a float32 base, no run: exported as it is
    assert len(report.files) > 1 and (tmp_path / "out/model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "out/merge_report.json").read_text())["into"] == "original"


def test_weights_stored_transposed_merge_exactly(tmp_path):
    """GPT-2's Conv1D keeps weights as (in, out): peft's fan_in_fan_out, which merge must follow row by row."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=288, n_positions=128))
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    expected = logits(random_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"],
                                     fan_in_fan_out=True))
    merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), verify=False)
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) - expected).abs().max() < 1e-4


def test_qlora_adapter_merges_into_the_weights_it_saw(tmp_path, tiny_base, alpaca_file):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(
        tiny_base("llama"), alpaca_file, quantization={"mode": "4bit", "compute_dtype": "float32"},
        train={"max_steps": 10})))
    trained = run(recipe, output=str(tmp_path / "run"))
    on_4bit_base = PeftModel.from_pretrained(load_base(recipe.model, recipe.quantization, recipe.model.name_or_path),
                                             trained.folder)
    expected = logits(on_4bit_base)

    dequantized = merge(trained.folder, tmp_path / "deq", into="dequantized")
    original = merge(trained.folder, tmp_path / "orig", into="original")
    diff_deq = (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "deq")) - expected).abs().max().item()
    diff_orig = (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "orig")) - expected).abs().max().item()
    # Dequantized weights + delta is the same arithmetic as the 4-bit kernel up to fp32 summation order (~1e-6);
    # 1e-4 leaves room for that and nothing more.
    assert dequantized.into == "dequantized" and diff_deq < 1e-4
    # the export carries the run's training prompt
    assert (tmp_path / "deq/chat_template.jinja").read_text() == (trained.folder / "chat_template.jinja").read_text()
    # Merging into the original weights drops the quantization error the adapter was trained on.
    print(f"4-bit adapter: merged into dequantized {diff_deq:.2e}, into original {diff_orig:.2e}")
    assert diff_orig > 100 * diff_deq and diff_orig > 1e-2
    assert original.verification.reference.startswith("adapter on the full-precision base")
    # The default measures both on the run's validation rows and keeps the better one.
    auto = merge(trained.folder, tmp_path / "auto")
    losses = auto.heldout_loss_by_target
    assert set(losses) == {"dequantized", "original"} and auto.into == min(losses, key=losses.get)
    assert auto.verification.passed and f"{losses[auto.into]:.4f}" in auto.into_reason


def test_export_loads_with_plain_transformers_and_no_peft(tmp_path):
    base = sharded_base(tmp_path / "base", "llama")
    expected = logits(random_adapter(base, tmp_path / "adapter"))
    merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), shard_size="300KB")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any import of peft now fails
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()
        AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})
        assert not hasattr(model.config, "quantization_config")
        with torch.no_grad():
            got = model(input_ids=torch.tensor({IDS.tolist()})).logits
        print((got - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """(base folder, adapter folder): ~10 shards of 20 MB, weights of up to 6 MB: several merge chunks each."""
    folder = tmp_path_factory.mktemp("wide")
    base = sharded_base(folder / "base", "llama", shard="20MB", hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
    random_adapter(base, folder / "adapter", r=4)
    return folder / "base", folder / "adapter"


def test_merge_holds_about_one_shard_in_memory(tmp_path, wide_base):
    """The merge's peak RSS growth stays under one 20 MB shard, whatever the model."""
    base, adapter = wide_base
    shards = list(base.glob("*.safetensors"))
    model_mb = sum(p.stat().st_size for p in shards) / 1e6
    script = textwrap.dedent(f"""
        import re
        from lora_tuner import merge
        def rss(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1e3
        def run(out):
            merge({str(adapter)!r}, out, base={str(base)!r}, shard_size="20MB", verify=False)
        run({str(tmp_path / 'warm-up')!r})  # first use pages in library code; that is not the merge's data
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        before = rss("VmRSS")
        run({str(tmp_path / 'out')!r})
        print(rss("VmHWM") - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = float(done.stdout.strip().splitlines()[-1])
    print(f"model {model_mb:.0f} MB in {len(shards)} shards; merge peak RSS growth {peak_mb:.0f} MB")
    assert len(shards) >= 8
    # chunks of rows are mapped, merged and written a few at a time: a few MB in memory, not a shard
    assert peak_mb < 20 < model_mb / 8


def test_weights_larger_than_a_chunk_equal_peft_merge(tmp_path, wide_base):
    """Weights merged in several chunks (on several threads) come out as peft's merge_and_unload."""
    base, adapter = wide_base
    merge(adapter, tmp_path / "out", base=str(base), shard_size="20MB", verify=False)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged = load_file_tensors(tmp_path / "out")
    assert max(t.nbytes for t in merged.values()) > 2 * CHUNK_BYTES  # the case under test
    assert merged.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_a_shard_too_large_for_the_file_system_is_one_line(tmp_path, wide_base):
    """A write failing on a worker thread (files capped at 1 MB, as FAT32 caps them at 4 GB) stops the merge with
    one line naming --shard-size; no export appears."""
    base, adapter = wide_base

    def cap_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    done = subprocess.run([sys.executable, "-m", "lora_tuner.cli", "merge", str(adapter), "--out", str(tmp_path / "out"),
                           "--base", str(base), "--no-verify"], preexec_fn=cap_file_size, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and "--shard-size" in errors[0] and "5,000,000,000 bytes" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line(tmp_path, small_disk):
    """Room for the weights (so the up-front space check passes) but not for the whole export: one line naming
    --out, and nothing in place."""
    base = sharded_base(tmp_path / "base", "llama", shard="5GB")
    random_adapter(base, tmp_path / "adapter")
    weights = sum(t.nbytes for t in load_file(tmp_path / "base" / "model.safetensors").values())
    disk = small_disk(-(-weights // 4096) * 4096)  # the weights rounded up to whole pages
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), "--out", str(disk / "out"),
                                       "--base", str(tmp_path / "base"), "--no-verify"])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output[-2000:]
    assert "--out" in errors[0] and "no space left" in errors[0] and "nothing was put in place" in errors[0]
    assert not list(disk.iterdir())  # no export, and no unfinished one to block the rerun


def load_file_tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def test_adapter_for_another_base_is_refused(tmp_path):
    gptj = sharded_base(tmp_path / "gptj", "gptj")
    random_adapter(gptj, tmp_path / "adapter")
    sharded_base(tmp_path / "llama", "llama")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"),
                                       "--base", str(tmp_path / "llama")])
    assert result.exit_code == 2
    assert "error: " in result.output and "which base" in result.output and str(tmp_path / "llama") in result.output
    assert not (tmp_path / "out").exists()


def test_dora_is_refused(tmp_path):
    base = sharded_base(tmp_path / "base", "llama")
    random_adapter(base, tmp_path / "dora", use_dora=True)
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "dora"), "--out", str(tmp_path / "out"),
                                       "--base", str(tmp_path / "base")])
    assert result.exit_code == 2 and "DoRA" in result.output and not (tmp_path / "out").exists()


def test_an_existing_out_folder_is_kept(tmp_path):
    """A mergeable adapter, so the refusal can only come from --out."""
    base = sharded_base(tmp_path / "base", "llama")
    random_adapter(base, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep.txt").write_text("mine")
    args = ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "taken"), "--base", str(tmp_path / "base")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--out" in result.output and "already holds" in result.output
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert CliRunner().invoke(main, args + ["--force"]).exit_code == 0  # and the same merge does work


def test_ctrl_c_while_merging_leaves_nothing_and_the_merge_can_be_rerun(tmp_path, monkeypatch):
    merge_module = importlib.import_module("lora_tuner.export.safetensors.merge")  # the package exports the function's name
    base = sharded_base(tmp_path / "base", "llama")
    random_adapter(base, tmp_path / "adapter")
    copy_side_files = merge_module._copy_side_files

    def stopped(*args, **kwargs):  # Ctrl-C after the weights are written, before the export is complete
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "_copy_side_files", stopped)
    with pytest.raises(KeyboardInterrupt):
        merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    monkeypatch.setattr(merge_module, "_copy_side_files", copy_side_files)
    assert merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base")).verification.passed


@pytest.mark.parametrize("stored,out", [("bfloat16", "bf16"), ("float32", "bf16"), ("bfloat16", "fp32"),
                                        ("float32", "fp16")])
def test_every_dtype_pair_merges_as_fp32_arithmetic_rounded_once(tmp_path, stored, out):
    """W + scale * B @ A computed in fp32 and rounded once into the output dtype, whatever the base's dtype; a
    non-float tensor in the base is copied as it is."""
    base = sharded_base(tmp_path / "base", "llama").to(getattr(torch, stored))
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    shard = sorted((tmp_path / "base").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.step_counter"] = torch.arange(7, dtype=torch.int64)  # a non-float tensor rides along
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((tmp_path / "base/model.safetensors.index.json").read_text())
    index["weight_map"]["model.step_counter"] = shard.name
    (tmp_path / "base/model.safetensors.index.json").write_text(json.dumps(index))
    adapter = random_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                             tmp_path / "adapter")
    merge(tmp_path / "adapter", tmp_path / "out", base=str(tmp_path / "base"), dtype=out, verify=False)
    merged = load_file_tensors(tmp_path / "out")
    assert torch.equal(merged["model.step_counter"], torch.arange(7))
    original = load_file_tensors(tmp_path / "base")
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[out]
    deltas = {name.removeprefix("base_model.model.").replace(".base_layer", ""): module.get_delta_weight("default")
              for name, module in adapter.named_modules() if hasattr(module, "get_delta_weight")}
    assert deltas
    for name, weight in original.items():
        if not weight.is_floating_point():
            continue
        delta = deltas.get(name.removesuffix(".weight"))
        expected = (weight.float() + (delta.float() if delta is not None else 0)).to(target)
        assert merged[name].dtype == target
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("out", ["bf16", "fp16", "fp32"])
def test_every_merged_chunk_is_checked_against_the_formula(tmp_path, monkeypatch, out):
    """A merge that puts merged rows in the wrong order is caught chunk by chunk before anything is put in place, in
    every output dtype; the correct merge passes the same check."""
    from lora_tuner.export.lora_deltas import LoraDeltas
    from lora_tuner.export.safetensors.streaming import MergeCheckFailed

    base = sharded_base(tmp_path / "base", "llama")
    random_adapter(base, tmp_path / "adapter")
    merge(tmp_path / "adapter", tmp_path / "good", base=str(tmp_path / "base"), dtype=out, verify=False)
    right_rows = LoraDeltas.merge_rows

    def rows_swapped(self, base_key, rows, first_row, out, scratch):
        right_rows(self, base_key, rows, first_row, out, scratch)
        out.copy_(out.flip(0))

    monkeypatch.setattr(LoraDeltas, "merge_rows", rows_swapped)
    with pytest.raises(MergeCheckFailed, match="differ from the base"):
        merge(tmp_path / "adapter", tmp_path / "bad", base=str(tmp_path / "base"), dtype=out, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "good"]


def test_an_8bit_run_trains_merges_and_exports(tmp_path, tiny_bpe_llama, alpaca_file):
    """bitsandbytes' LLM.int8 trains on CPU: the loss falls, plain peft reloads the adapter onto the 8-bit base to the
    same logits, the default merge (into the original weights: 8-bit keeps outlier columns apart, so there is no one
    dequantized weight) verifies, and the run exports to a GGUF that verifies too."""
    from lora_tuner.export.gguf.export import export_gguf

    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(
        str(tiny_bpe_llama), alpaca_file, quantization={"mode": "8bit", "compute_dtype": "float32"},
        train={"max_steps": 30, "learning_rate": 1e-2})))
    trained = run(recipe, output=str(tmp_path / "run"))
    losses = [row["loss"] for row in RunFolder(trained.folder).metrics() if "loss" in row]
    assert losses[-1] < 0.8 * losses[0], losses
    assert trained.manifest.base_model.quantization.mode == "8bit"
    on_8bit = PeftModel.from_pretrained(load_base(recipe.model, recipe.quantization, recipe.model.name_or_path),
                                        trained.folder)
    # TRL trains adapters on a quantized base in bf16 and saves them so; peft upcasts them on load: same values,
    # compared in the dtype they were trained in (as test_pipeline does for 4-bit)
    trained_dtypes = {name: p.dtype for name, p in trained.model.named_parameters() if "lora_" in name}
    for name, param in on_8bit.named_parameters():
        if name in trained_dtypes:
            param.data = param.data.to(trained_dtypes[name])
    assert (logits(on_8bit) - logits(trained.model.eval())).abs().max() < 1e-5

    report = merge(trained.folder, tmp_path / "merged")
    assert report.into == "original" and "8-bit" in report.into_reason and report.verification.passed
    exported = export_gguf(trained.folder, tmp_path / "run.gguf", kind="f16", verify_rows=8)
    assert exported.verification.passed and Path(exported.file).is_file()
