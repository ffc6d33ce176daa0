"""What a verification found, as merge_report.json and *.export_report.json record it."""
from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Verification(Record):
    reference: str  # what the export is compared with
    rows: int  # prompt/completion rows scored
    held_out: bool  # the rows were held out of training
    tokens: int  # response tokens scored
    top1_agreement: float
    mean_kl: float  # KL(reference || export) per response token
    max_abs_logit_diff: float
    loss_export: float  # mean response-token cross-entropy
    loss_adapter: float  # the reference: base + adapter
    loss_base: float  # the reference's base alone
    gain_kept: float | None  # (base - export) / (base - adapter); None when the adapter gained nothing
    loss_rule: str  # 'gain': kept >= 99% of a large gain decided; 'rounding': within what 16-bit rounding costs
    passed: bool
    why: str  # the criterion that decided


class GgufVerification(Record):
    judge: str  # what loaded the file and computed its logits: llama.cpp itself, or transformers' reader without it
    rows: int
    held_out: bool  # the run's held-out rows; False: fixed sample text (a merged folder that carries no rows)
    tokens: int
    top1_agreement: float  # with the merged model, both computed in float32
    mean_kl: float
    max_abs_logit_diff: float
    tokenizer_round_trip: bool  # the judge tokenizes sample text and the rows to the trained tokenizer's ids
    min_top1: float  # the threshold for this type
    passed: bool
