"""GGUF export: a file transformers' own GGUF reader loads back to the merged model, with the training prompt."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader

from helpers import CONFIGS, SHARED, recipe_dict, write_recipe
from lora_tuner import load_recipe, run
from lora_tuner.cli import main
from lora_tuner.export.gguf.export import export_gguf
from lora_tuner.export.gguf.writer import rotary_permute
from lora_tuner.verify import llama_cpp

pytestmark = pytest.mark.slow  # trains and exports
LLAMA_CPP = llama_cpp.version()  # installed by .ci/run from ../shared/wheels; judged by transformers without it


def test_rotary_permutation_interleaves_each_heads_halves():
    rows = torch.arange(8).float().unsqueeze(1)  # two heads of four rows: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    assert rotary_permute(rows, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, tiny_bpe_llama, alpaca_file):
    folder = tmp_path_factory.mktemp("bpe-run")
    # bf16 as users train (dtype auto on CPUs and GPUs with bf16): its merge exports to fp16 nearly exactly
    recipe = recipe_dict(str(tiny_bpe_llama), alpaca_file, train={"max_steps": 20}, lora={"rank": 4},
                         model={"dtype": "bfloat16"})
    return run(load_recipe(write_recipe(folder, recipe)), output=str(folder / "run")).folder


def test_a_run_folder_exports_to_a_gguf_that_reads_back_as_the_merged_model(bpe_run, tmp_path):
    out = tmp_path / "model.gguf"
    result = CliRunner().invoke(main, ["export", str(bpe_run), "--type", "f16", "--out", str(out), "--verify-rows", "8"])
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(out.with_suffix(".export_report.json").read_text())
    v = report["verification"]
    # f16 holds the merged fp16 weights exactly: llama.cpp loads it (it refuses unknown pre-tokenizer names),
    # tokenizes as training did and picks the same top-1 everywhere; its f16 matmuls round activations to f16 too
    assert v["judge"].startswith("llama.cpp" if LLAMA_CPP else "transformers")
    assert v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] < 0.05 and v["tokenizer_round_trip"]
    assert report["merged_on_the_fly"] and not list(tmp_path.glob(".*"))  # temporary files gone
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names  # an untied head is written
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == (bpe_run / "chat_template.jinja").read_text()  # the training prompt travels
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert "{{ .Prompt }}" in modelfile and "### Instruction:" in modelfile and 'PARAMETER stop "</s>"' in modelfile


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_a_large_gguf_is_tokenized_by_llama_cpp_and_read_back_streamed(bpe_run, tmp_path, monkeypatch):
    """Over the size llama.cpp computes logits for (it would hold the whole model), llama.cpp still loads the
    vocabulary and tokenizes, and the logits come from the streamed read-back: same verdict for a sound file."""
    from lora_tuner.verify import verdict

    monkeypatch.setattr(verdict, "LLAMA_CPP_LOGITS_MAX_BYTES", 0)
    v = export_gguf(bpe_run, tmp_path / "model.gguf", kind="f16", verify_rows=8).verification
    assert "loaded its vocabulary and tokenized" in v.judge and "streamed" in v.judge
    assert v.passed and v.tokenizer_round_trip and v.top1_agreement == 1.0 and v.max_abs_logit_diff < 1e-4


def test_the_streamed_read_back_equals_transformers_gguf_loader(bpe_run, tiny_bpe_llama, tmp_path):
    """Without llama.cpp, and for files too large for it, verification reads the GGUF a tensor at a time through
    transformers' name map: the logits equal those of transformers' own whole-model GGUF loader."""
    from transformers import AutoModelForCausalLM

    from lora_tuner.weights.gguf import gguf_weight_map
    from lora_tuner.verify.streamed import streamed_model
    from lora_tuner.weights.weight_map import config_of

    out = tmp_path / "model.gguf"
    export_gguf(bpe_run, out, kind="q8_0", verify=False)
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    config = config_of(tiny_bpe_llama)  # the run's base
    streamed = streamed_model(config, gguf_weight_map(out, config))
    with torch.no_grad():
        want, got = whole(ids).logits, streamed(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_gguf_missing_a_weight_is_refused_on_import_and_export(tiny_bpe_llama, tmp_path):
    """transformers would fill a missing tensor with random values: import-gguf refuses the file in one line, and
    the export's verification refuses a model folder that lacks a weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_tuner.errors import UserError
    from lora_tuner.model.gguf_import import import_gguf

    folder = Path(shutil.copytree(tiny_bpe_llama, tmp_path / "holed"))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="weights are missing .*layers.1.self_attn.q_proj"):
        export_gguf(folder, tmp_path / "checked.gguf", kind="f16")
    export_gguf(folder, tmp_path / "holed.gguf", kind="f16", verify=False)
    result = CliRunner().invoke(main, ["import-gguf", str(tmp_path / "holed.gguf"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "weights are not in the file" in result.output, result.output
    assert "layers.1.self_attn.q_proj" in result.output and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not in the file"):
        import_gguf(tmp_path / "holed.gguf", tmp_path / "out")


def test_a_run_that_lost_its_tokenizer_files_still_exports_its_training_prompt(bpe_run, tmp_path):
    """The merge takes the base's tokenizer then, and writes the chat template from the run's recipe."""
    import shutil

    run = Path(shutil.copytree(bpe_run, tmp_path / "run"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (run / name).unlink(missing_ok=True)
    export_gguf(run, tmp_path / "model.gguf", kind="q8_0", verify=False)
    template = bytes(GGUFReader(tmp_path / "model.gguf").fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == (bpe_run / "chat_template.jinja").read_text()


def test_a_disk_that_fills_during_export_or_import_is_one_line(bpe_run, tmp_path, small_disk):
    """Room for the merge the export starts with (its up-front check passes) but not for the GGUF too; no room for
    an imported model."""
    export_gguf(bpe_run, tmp_path / "model.gguf", kind="f16", verify=False)
    for disk, args in ((small_disk(320 * 1024), ["export", str(bpe_run), "--type", "f16", "--no-verify", "--out"]),
                       (small_disk(64 * 1024), ["import-gguf", str(tmp_path / "model.gguf"), "--out"])):
        result = CliRunner().invoke(main, args + [str(disk / "out")])
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output[-2000:]
        assert "no space left" in errors[0] and "nothing was put in place" in errors[0]
        assert not list(disk.iterdir())


def test_q8_0_and_q4_0_quantize_matrices_and_keep_norms(bpe_run, tmp_path):
    for kind, embedding in (("q8_0", "Q8_0"), ("q4_0", "Q8_0")):
        out = tmp_path / f"{kind}.gguf"
        export_gguf(bpe_run, out, kind=kind, verify=False)
        types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
        assert types["token_embd.weight"] == embedding  # the embedding stays at q8_0 in a q4_0 file


def test_tied_embeddings_write_no_output_head(tmp_path, tiny_bpe_llama):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = {**CONFIGS["llama"], "vocab_size": 320, "tie_word_embeddings": True}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_bpe_llama).save_pretrained(tmp_path / "tied")
    report = export_gguf(tmp_path / "tied", tmp_path / "tied.gguf", kind="f16", verify_rows=4)
    assert report.verification.passed
    assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "tied.gguf").tensors}


def spm_tokenize(text: str, reader: GGUFReader) -> list[int]:
    """llama.cpp's SentencePiece rule, written out: start from characters, merge the adjacent pair whose join has the
    highest score until none is in the vocabulary; characters outside it become byte tokens."""
    field = reader.fields
    tokens = [bytes(field["tokenizer.ggml.tokens"].parts[i]).decode() for i in field["tokenizer.ggml.tokens"].data]
    scores = [float(field["tokenizer.ggml.scores"].parts[i][0]) for i in field["tokenizer.ggml.scores"].data]
    ids = {token: i for i, token in enumerate(tokens)}
    prefix = bool(field["tokenizer.ggml.add_space_prefix"].parts[-1][0])
    symbols = list(("\u2581" if prefix else "") + text.replace(" ", "\u2581"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [ids[s] if s in ids else ids[f"<0x{byte:02X}>"] for s in symbols for byte in ([0] if s in ids else s.encode())]


@pytest.mark.skipif(not (SHARED / "tokenizers/llama/tokenizer.model").is_file(), reason="needs ../shared")
def test_a_sentencepiece_llama_tokenizes_in_the_gguf_as_in_training(tmp_path):
    """transformers saves SentencePiece tokenizers (LLaMA 1/2, Mistral) as BPE with byte fallback in tokenizer.json
    alone: written as llama.cpp's SentencePiece vocabulary, whose merge order lives in the scores."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer

    folder = tmp_path / "llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**CONFIGS["llama"], "vocab_size": 32000})).save_pretrained(
        folder)
    tokenizer = LlamaTokenizer.from_pretrained(SHARED / "tokenizers/llama")
    tokenizer.save_pretrained(folder)
    export_gguf(folder, tmp_path / "llama.gguf", kind="f16", verify=False)  # the weights: tested above
    reader = GGUFReader(tmp_path / "llama.gguf")
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="llama.gguf")  # transformers' own GGUF reader
    in_llama_cpp = llama_cpp.load(tmp_path / "llama.gguf") if LLAMA_CPP else None  # the whole file, as llama.cpp does
    rows = json.loads((SHARED / "data/alpaca_5000.json").read_text())[:40]
    for text in [f"{row['instruction']}\n{row['input']}\n{row['output']}" for row in rows]:
        trained = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert spm_tokenize(text, reader) == trained, text  # llama.cpp's rule, written out
        assert read_back(text, add_special_tokens=False)["input_ids"] == trained, text
        if in_llama_cpp:
            assert llama_cpp.tokenize(in_llama_cpp, text) == trained, text  # llama.cpp itself


def test_other_architectures_are_refused_in_one_line(tmp_path, tiny_base):
    result = CliRunner().invoke(main, ["export", tiny_base("gptj"), "--out", str(tmp_path / "x.gguf")])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "GPTJForCausalLM" in errors[0] and "LLaMA-family" in errors[0] and "convert_hf_to_gguf" in errors[0]
    assert not list(tmp_path.iterdir())


def strong_adapter(run_folder: Path, out: Path) -> Path:
    """The run with large random LoRA weights: the adapter then moves most top-1 tokens away from the base's, so
    an adapter GGUF applied wrongly (or over another base) cannot pass for right."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run_folder, out)
    tensors = load_file(out / "adapter_model.safetensors")
    torch.manual_seed(0)
    save_file({k: torch.randn_like(v) * 0.2 for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out


def reseeded_base(base: Path, out: Path) -> Path:
    """The same architecture and tokenizer with other random weights: a base the adapter was not trained on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(base, out)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(out)
    return out


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_the_adapter_alone_exports_to_a_lora_gguf_llama_cpp_applies_over_the_base(bpe_run, tiny_bpe_llama, tmp_path):
    adapter = strong_adapter(bpe_run, tmp_path / "run")
    base_gguf = export_gguf(tiny_bpe_llama, tmp_path / "base.gguf", kind="f16", verify=False).file
    out = tmp_path / "run-lora.gguf"
    result = CliRunner().invoke(main, ["export", str(adapter), "--format", "gguf-lora", "--base-gguf", base_gguf,
                                       "--out", str(out), "--verify-rows", "8"])
    assert result.exit_code == 0, result.output[-3000:]
    v = json.loads(out.with_suffix(".export_report.json").read_text())["verification"]
    # llama.cpp, applying A and B over the f16 base at load time, computes what base + adapter computes in float32
    assert v["judge"].startswith("llama.cpp") and v["top1_agreement"] >= 0.999 and v["tokenizer_round_trip"], v
    reader = GGUFReader(out)
    text = {key: bytes(reader.fields[key].parts[-1]).decode() for key in ("general.type", "adapter.type")}
    assert text == {"general.type": "adapter", "adapter.type": "lora"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == config["lora_alpha"]
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_down.weight.lora_b"} <= names
    assert out.stat().st_size < Path(base_gguf).stat().st_size / 2  # the adapter, not a copy of the model
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.splitlines()[:2] == [f"FROM {base_gguf}", f"ADAPTER ./{out.name}"]
    assert "{{ .Prompt }}" in modelfile and "### Instruction:" in modelfile  # the training prompt

    # over a base it was not trained on, llama.cpp's answers are not base + adapter's: refused, nothing put in place
    other = export_gguf(reseeded_base(tiny_bpe_llama, tmp_path / "other"), tmp_path / "other.gguf", kind="f16",
                        verify=False).file
    refused = CliRunner().invoke(main, ["export", str(adapter), "--format", "gguf-lora", "--base-gguf", other,
                                        "--out", str(tmp_path / "wrong.gguf"), "--verify-rows", "8"])
    assert refused.exit_code == 2 and "error: " in refused.output and "of top-1 tokens" in refused.output, \
        refused.output[-2000:]
    assert not (tmp_path / "wrong.gguf").exists() and not list(tmp_path.glob(".wrong*"))


def block_wide_llama(tiny_bpe_llama: Path, out: Path) -> Path:
    """tiny_bpe_llama's tokenizer on a model whose rows are whole 256-value k-quant blocks (hidden 256, FFN 512),
    initialised wide enough that its next-token choices are not near-ties. Its 4 heads of 32 make the attention
    narrower than the model, as Mistral NeMo's is: llama.cpp then needs the key and value lengths written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tiny_bpe_llama, out)
    config = AutoConfig.from_pretrained(tiny_bpe_llama)
    config.update({"hidden_size": 256, "intermediate_size": 512, "head_dim": 32, "initializer_range": 0.08})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_a_q4_k_m_export_mixes_types_as_llama_quantize_and_loads_in_llama_cpp(tiny_bpe_llama, tmp_path):
    """The mix and its loading; its quality is judged on real weights (test_real_model.py): on a random model every
    4-bit type flips many near-tied top-1 tokens."""
    from transformers import AutoTokenizer

    model = block_wide_llama(tiny_bpe_llama, tmp_path / "wide")
    export_gguf(model, tmp_path / "m.gguf", kind="q4_k_m", verify=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    # llama-quantize's Q4_K_M on 2 layers: the output head, and layer 1's V and FFN-down projections (the last
    # eighth of the layers) in Q6_K; every other matrix in Q4_K; norms in F32
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert [types[f"blk.{i}.attn_v.weight"] for i in (0, 1)] == ["Q4_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in (0, 1)] == ["Q4_K", "Q6_K"]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    loaded = llama_cpp.load(tmp_path / "m.gguf", context=64)  # it refused the file before key lengths were written
    text = "Reverse the word: apple"
    assert llama_cpp.tokenize(loaded, text) == AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)[
        "input_ids"]
    llama_cpp.close(loaded)


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_k_quant_exports_hold_what_llama_cpps_own_quantizer_writes(tiny_bpe_llama, tmp_path):
    """lora-tune's k-quant files against llama.cpp's own quantizer (llama_model_quantize, what llama-quantize runs),
    given the same values: weights f16 holds exactly, and llama.cpp starting from lora-tune's f16 export. Every
    tensor gets llama.cpp's type in each mix, and its bytes."""
    from transformers import AutoModelForCausalLM

    model = block_wide_llama(tiny_bpe_llama, tmp_path / "wide")
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16).save_pretrained(model)
    export_gguf(model, tmp_path / "f16.gguf", kind="f16", verify=False)
    for kind in ("q4_k_m", "q5_k_m", "q6_k"):
        export_gguf(model, tmp_path / f"ours-{kind}.gguf", kind=kind, verify=False)
        llama_cpp.quantize(tmp_path / "f16.gguf", tmp_path / f"theirs-{kind}.gguf", kind)
        ours = {t.name: t for t in GGUFReader(tmp_path / f"ours-{kind}.gguf").tensors}
        theirs = {t.name: t for t in GGUFReader(tmp_path / f"theirs-{kind}.gguf").tensors}
        assert set(ours) == set(theirs), kind
        assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
        assert {t.tensor_type.name for t in theirs.values()} >= {"Q6_K"}, kind  # a k-quant was compared
        for name, tensor in theirs.items():
            same = np.asarray(ours[name].data) == np.asarray(tensor.data)
            assert same.all(), (kind, name, f"{1 - same.all(axis=-1).mean():.1%} of its rows differ")


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_llama_cpps_own_log_stays_out_of_the_terminal(bpe_run, tmp_path):
    """llama.cpp logs to file descriptor 2, also as it frees a model: none of it reaches an export's user (pytest's
    own capture would hide it, so a fresh process loads and frees the file as verification does)."""
    export_gguf(bpe_run, tmp_path / "m.gguf", kind="f16", verify=False)
    probe = "import sys; from lora_tuner.verify import llama_cpp; llama_cpp.close(llama_cpp.load(sys.argv[1], context=64))"
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "m.gguf")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "llama" not in done.stderr, done.stderr[-2000:]


def test_a_failed_export_says_what_to_try_and_never_blocks_the_next_attempt(bpe_run, tmp_path, monkeypatch):
    """A file that fails its verification is not put in place; its report lands beside as NAME.failed...json, the fix
    names a type that keeps more of the model (never the type that failed), and the next export needs no --force."""
    from lora_tuner.verify import verdict

    out = tmp_path / "model.gguf"
    args = ["export", str(bpe_run), "--type", "f16", "--out", str(out), "--verify-rows", "4"]
    monkeypatch.setitem(verdict.GGUF_MIN_TOP1, "f16", 1.01)  # a threshold nothing meets: this export fails
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 2, failed.output[-3000:]
    error = next(line for line in failed.output.splitlines() if line.startswith("error: "))
    assert "try --type bf16" in error and "--type f16" not in error and "failed.export_report.json" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.export_report.json"]
    assert json.loads((tmp_path / "model.failed.export_report.json").read_text())["verification"]["passed"] is False
    monkeypatch.setitem(verdict.GGUF_MIN_TOP1, "f16", 0.995)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output[-3000:]
    assert {"model.gguf", "model.Modelfile", "model.export_report.json"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("kind,fix", [("f16", "--type bf16"), ("bf16", "--type f16"), ("q8_0", "--type f16"),
                                      ("q4_k_m", "--type q8_0 or f16"), ("q4_0", "--type q8_0 or f16")])
def test_the_fix_for_a_failed_export_points_at_more_precision(kind, fix):
    from lora_tuner.export.gguf.beside import export_fix

    assert fix in export_fix(kind, None) and f"--type {kind} " not in export_fix(kind, None) + " "
