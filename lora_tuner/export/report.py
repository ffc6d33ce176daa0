"""merge_report.json: what was merged into what, in which dtype and why, and how the export scored."""
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
    gain_kept: float | None  # (base - export) / (base - adapter); None when the adapter's gain is too small to measure
    passed: bool
    why: str  # the criterion that decided


class MergeReport(Record):
    adapter: str
    base: str
    into: str  # 'original' or 'dequantized'
    into_reason: str
    dtype: str
    dtype_reason: str
    heldout_loss_by_target: dict[str, float]  # --into auto: each candidate's loss on the verification rows
    files: list[str]
    seconds: float
    base_quantization: str
    recipe_sha256: str | None
    verification: Verification | None  # None with --no-verify


class GgufVerification(Record):
    rows: int
    held_out: bool  # the run's held-out rows; False: fixed sample text (a merged folder that carries no rows)
    tokens: int
    top1_agreement: float  # with the merged model, both computed in float32
    mean_kl: float
    max_abs_logit_diff: float
    tokenizer_round_trip: bool  # the GGUF's vocabulary encodes the sample text to the same ids
    min_top1: float  # the threshold for this type
    passed: bool


class ExportReport(Record):
    source: str
    merged_on_the_fly: bool  # SOURCE was a run folder, merged (as lora-tune merge does) into a temporary folder
    file: str
    type: str
    bytes: int
    seconds: float
    chat_template: bool  # the GGUF carries the training prompt as its chat template
    modelfile: str  # the Ollama Modelfile written beside it
    verification: GgufVerification | None
