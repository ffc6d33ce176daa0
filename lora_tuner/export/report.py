"""merge_report.json: what was merged into what, in which dtype and why, and how the export scored."""
from ..verify.report import GgufVerification, Record, Verification


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


class ExportReport(Record):
    source: str
    merged_on_the_fly: bool  # SOURCE was a run folder, merged (as lora-tune merge does) into a temporary folder
    file: str
    type: str
    bytes: int
    seconds: float
    chat_template: bool  # the GGUF carries the training prompt as its chat template
    modelfile: str  # the Ollama Modelfile written beside it
    applies_to: str | None = None  # --format gguf-lora: the base GGUF the adapter is applied over
    verification: GgufVerification | None
