"""Prove an export by what users care about: on the run's held-out rows, the export must pick the adapter's most
likely tokens, stay close to its distribution, and lose no more loss than its dtype's rounding costs. A max-logit
ratio is not used: 30 real layers rounding every weight to 16 bits exceed any useful one while the model is as good
as before.

Every model here is streamed (streamed.py): the reference, the adapter on its base, is computed in float32 from the
base's tensors with the adapter's delta added per tensor, the exact model the adapter defines; the export from its
weights as written. So verifying a 7B export needs a few tensors in memory, not a float32 model.

Thresholds, from SmolLM2-135M (bf16 base, a 20-step r16 all-linear run, 16 held-out rows, 949 response tokens): a
float32 export agrees on 100% of top-1 tokens (KL 2e-9), float16 on 99.9% (KL 2e-5), both keeping 100.0% of the
gain; bfloat16 agrees on 96.6% (KL 7e-3) and keeps 92.3% of it, so it fails, as a merge of the wrong rows would by
far more.

The loss rule. Rounding W + delta to 16 bits adds an error of about half a unit in the last place to every weight,
whatever the delta's size: its cost in loss is roughly fixed (second order in that error), while the adapter's gain
grows with training. So "keeps 99% of the gain" refuses sound exports of short runs (a 5-step SmolLM2 run gained
0.075 nats and its fp16 merge lost 0.0036: 95.2%, at KL 2.8e-5 and top-1 99.8%). The export passes when it keeps 99%
of the gain or stays within ROUNDING_COST nats of the adapter, whichever allows more; the report says which rule
decided. A merge of wrong rows, scale or layout moves the loss by far more than either."""
from dataclasses import dataclass
from pathlib import Path

from ..errors import fail
from ..run_folder import RunFolder
from . import LLAMA_CPP_LOGITS_MAX_BYTES, MAX_LENGTH, ROWS
from .report import GgufVerification, Verification
from .scoring import Batch, agreement, batches, loss, packed, reference_logits, scored_tokens, tokenized_rows
from .streamed import packs_apart, streamed_model

MIN_TOP1 = 0.99
MAX_KL = 1e-3
MIN_GAIN_KEPT = 0.99
ROUNDING_COST = 0.005  # nats: what 16-bit rounding of the merged weights may cost (measured up to 0.0036, above)
FALLBACK = ["Below is an instruction that describes a task.", "The quick brown fox jumps over the lazy dog.",
            "def fibonacci(n):", "Write a short poem about the sea."]
# GGUF top-1 agreement with the merged model on held-out rows, by type. f16/bf16 hold the merged weights exactly (when
# merged in that dtype): 100% measured; a bf16 model written as f16 rounds its smallest weights, and llama.cpp's f16
# activations flipped 1 of SmolLM2's 965 tokens (99.9%, just under 0.999). q8_0 and q4_0 from SmolLM2-135M (16
# held-out rows, 1,002 tokens): 98.7% and 70.3%; a 135M model loses much to 4 bits, and a broken export (e.g.
# unpermuted Q/K rows) agrees on a few percent.
# k-quants on the SmolLM2 base, in llama.cpp (16 rows, 965 tokens; q8_0 97.3%, q4_0 73.0% there): q6_k 95.4%,
# q5_k_m 87.1%, q4_k_m 88.9%, q5_k 85.9%, q4_k 84.4%. SmolLM2's 576-wide rows are not whole 256-value blocks, so
# most of its matrices take llama.cpp's fallback types (Q5_0, Q5_1, Q8_0), and its weights come from a Q4_1 file,
# whose grid Q4_K happens to fit: Q4_K beats Q5_K on them, not on other weights (tests/test_kquants.py).
GGUF_MIN_TOP1 = {"f16": 0.995, "bf16": 0.995, "q8_0": 0.95, "q4_0": 0.60, "q6_k": 0.92, "q5_k_m": 0.80,
                 "q4_k_m": 0.75, "q5_k": 0.78, "q4_k": 0.75}
# Tokenized by the GGUF's judge and the trained tokenizer alike, with the verification rows' own text. Not a run of
# spaces at the start of a text: there transformers' conversion of SentencePiece tokenizers to BPE (LLaMA 1/2) splits
# "  a" as "▁▁" "a" where SentencePiece itself, and llama.cpp with it, gives "▁▁" "▁a".
SAMPLE_TEXT = ["Hello world! 123 + 456 = 579.", "tabs\tand\nnewlines,  two spaces", "naïve café, 東京, emoji 🙂",
               "def f(x):\n    return {'a': [1, 2]}"]


@dataclass
class Source:
    """A model to score: its config and its weights by name (a verify.streamed.WeightMap)."""
    config: object
    weights: object
    name: str

    def model(self):
        return streamed_model(self.config, self.weights, self.name)


@dataclass
class Rows:
    batches: list[Batch]
    count: int
    held_out: bool  # the run's held-out rows; False: fixed sample text or rows training saw
    texts: list[str]  # the rows' plain text, for tokenizer checks


def verification_rows(run: RunFolder, tokenizer_folder: Path, config, rows: int = ROWS) -> Rows:
    """The rows the run stored (fixed text for a bare PEFT adapter), as one batch: a streamed model reads every
    weight once per batch. Packed into one row where the architecture keeps packed examples apart (no padding to
    compute: ~40% less work on Alpaca rows), else padded."""
    from transformers import AutoTokenizer

    examples, held_out = run.validation()
    if not examples:
        examples, held_out = [{"prompt": "", "completion": text} for text in FALLBACK], False
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    max_length = run.recipe().data.max_length if run.is_run else MAX_LENGTH
    tokenized = tokenized_rows(tokenizer, examples[:rows], min(max_length, MAX_LENGTH))
    if not scored_tokens(tokenized):
        raise fail("verification", f"the {len(examples[:rows])} verification rows give no "
                   "response tokens to score (the tokenizer encodes them to nothing, or every row is longer than "
                   f"{min(max_length, MAX_LENGTH)} tokens)", "check the tokenizer files, or pass --no-verify",
                   source=str(tokenizer_folder))
    texts = [e["prompt"] + e["completion"] for e in examples[:rows] if isinstance(e["prompt"], str)]
    pad = tokenizer.pad_token_id or 0
    if packs_apart(config):
        layout = [packed(tokenized, pad, 2 * MAX_LENGTH)]
    else:
        layout = batches(tokenized, pad, len(tokenized))
    return Rows(layout, len(tokenized), held_out, texts)


def export_loss(export: Source, rows: Rows) -> float:
    return loss(export.model(), rows.batches, desc=f"scoring {export.name}")


def verify_merge(export: Source, reference: Source, base: Source, rows: Rows) -> Verification:
    """A merged export against the adapter on its base (reference) and the base alone (for the gain)."""
    want = reference_logits(reference.model(), rows.batches, desc="scoring the adapter")
    base_loss = loss(base.model(), rows.batches, desc="scoring the base")
    found = agreement(reference_logits(export.model(), rows.batches, desc="verifying"), want, rows.batches)
    gain = base_loss - found.reference_loss
    kept = (base_loss - found.loss) / gain if gain > 0 else None
    gap = found.loss - found.reference_loss
    if kept is not None and (1 - MIN_GAIN_KEPT) * gain > ROUNDING_COST:
        rule, loss_ok = "gain", kept >= MIN_GAIN_KEPT
        loss_why = f"keeps {kept:.1%} of the adapter's loss gain (>= {MIN_GAIN_KEPT:.0%})"
    else:
        rule, loss_ok = "rounding", gap <= ROUNDING_COST
        loss_why = f"loss {gap:+.4f} nats from the adapter's (<= {ROUNDING_COST}, what 16-bit rounding costs)"
    checks = [(found.top1_agreement >= MIN_TOP1, f"top-1 agreement {found.top1_agreement:.1%} (>= {MIN_TOP1:.0%})"),
              (found.mean_kl <= MAX_KL, f"mean KL {found.mean_kl:.2e} (<= {MAX_KL})"), (loss_ok, loss_why)]
    failed = [why for ok, why in checks if not ok]
    return Verification(
        reference=reference.name, rows=rows.count, held_out=rows.held_out, tokens=found.tokens,
        top1_agreement=found.top1_agreement, mean_kl=found.mean_kl, max_abs_logit_diff=found.max_abs_logit_diff,
        loss_export=found.loss, loss_adapter=found.reference_loss, loss_base=base_loss, gain_kept=kept,
        loss_rule=rule, passed=not failed, why="; ".join(failed or [why for _, why in checks]))


def verify_gguf(gguf_file: Path, gguf: Source, merged: Source, merged_folder: Path, kind: str,
                rows: Rows) -> GgufVerification:
    """The GGUF against the merged model it was written from (float32), judged by llama.cpp itself where its binding
    is installed: it must load the file, tokenize sample text to the trained tokenizer's ids, and compute logits that
    agree at the type's threshold. For files over LLAMA_CPP_LOGITS_MAX_BYTES llama.cpp loads the vocabulary and
    tokenizes, and the logits are read back streamed: llama.cpp holds a whole model in memory (on CPUs it repacks the
    weights it maps: a 7B q8_0 verification peaked at 11 GB that way). Without the binding,
    transformers' GGUF reader is the judge, and the report says so."""
    from transformers import AutoTokenizer

    from . import llama_cpp

    want = reference_logits(merged.model(), rows.batches, desc="scoring the merged model")
    ours = AutoTokenizer.from_pretrained(merged_folder)
    version = llama_cpp.version()
    if version is None:
        theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        round_trip = all(ours(text)["input_ids"] == theirs(text)["input_ids"] for text in SAMPLE_TEXT + rows.texts)
        judge, found = "transformers' GGUF reader (llama-cpp-python is not installed)", None
    else:
        small = gguf_file.stat().st_size <= LLAMA_CPP_LOGITS_MAX_BYTES
        try:
            model = llama_cpp.load(gguf_file, vocab_only=not small, context=_context(rows))
        except llama_cpp.Refused as refused:
            raise fail("verification", f"llama.cpp {version} refuses the file: {refused}",
                       "report this with the file's export_report.json", source=str(gguf_file)) from None
        round_trip = _tokenizes_alike(ours, model, rows)
        if small:
            judge, found = f"llama.cpp (llama-cpp-python {version})", llama_cpp.response_logits(model, rows.batches)
        else:
            judge, found = (f"llama.cpp (llama-cpp-python {version}) loaded its vocabulary and tokenized; logits "
                            "read back streamed, as the file is over 2 GiB"), None
        llama_cpp.close(model)
    if found is None:
        found = reference_logits(gguf.model(), rows.batches, desc="verifying the gguf")
    return _gguf_verdict(judge, found, want, rows, kind, round_trip)


def verify_gguf_adapter(adapter_gguf: Path, base_gguf: Path, base_type: str, reference: Source, tokenizer_folder: Path,
                        rows: Rows) -> GgufVerification:
    """A LoRA GGUF as llama.cpp applies it over the base GGUF, against base + adapter computed in float32: llama.cpp
    must load both, tokenize as training did, and agree at the threshold of the base file's type (its quantization is
    part of what the user runs). Only llama.cpp reads adapter GGUFs, so without its binding there is no judge."""
    from transformers import AutoTokenizer

    from . import llama_cpp

    version = llama_cpp.version()
    if version is None:
        raise fail("verification", "only llama.cpp reads LoRA GGUFs, and llama-cpp-python is not "
                   "installed", "pip install llama-cpp-python, or pass --no-verify", source=str(adapter_gguf))
    want = reference_logits(reference.model(), rows.batches, desc="scoring base + adapter")
    try:
        model = llama_cpp.load(base_gguf, context=_context(rows), lora=adapter_gguf)
    except llama_cpp.Refused as refused:
        raise fail("verification", f"llama.cpp {version} refuses it over {str(base_gguf)!r}: "
                   f"{refused}", "pass the GGUF of the base this adapter was trained on as --base-gguf",
                   source=str(adapter_gguf)) from None
    round_trip = _tokenizes_alike(AutoTokenizer.from_pretrained(tokenizer_folder), model, rows)
    found = llama_cpp.response_logits(model, rows.batches)
    llama_cpp.close(model)
    return _gguf_verdict(f"llama.cpp (llama-cpp-python {version}), applied over {base_gguf.name}", found, want, rows,
                         base_type, round_trip)


def _gguf_verdict(judge: str, found, want, rows: Rows, kind: str, round_trip: bool) -> GgufVerification:
    """The judge's logits against the reference's, held to the type's threshold."""
    result = agreement(found, want, rows.batches)
    return GgufVerification(judge=judge, rows=rows.count, held_out=rows.held_out, tokens=result.tokens,
                            top1_agreement=result.top1_agreement, mean_kl=result.mean_kl,
                            max_abs_logit_diff=result.max_abs_logit_diff, tokenizer_round_trip=round_trip,
                            min_top1=GGUF_MIN_TOP1[kind], passed=round_trip and result.top1_agreement >= GGUF_MIN_TOP1[kind])


def _context(rows: Rows) -> int:
    """The context llama.cpp needs for the longest verification example."""
    return max(len(ids) for batch in rows.batches for ids, _ in batch.examples()) + 1


def _tokenizes_alike(ours, model, rows: Rows) -> bool:
    """llama.cpp tokenizes sample text and the rows' text to the trained tokenizer's ids."""
    from . import llama_cpp

    return all(ours(text, add_special_tokens=False)["input_ids"] == llama_cpp.tokenize(model, text)
               for text in SAMPLE_TEXT + rows.texts)
