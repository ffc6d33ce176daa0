"""Examples to token ids, done here rather than by TRL so that every row trains on its prompt exactly as inference
will tokenize it. TRL tokenizes prompt and prompt+completion and cuts at their common prefix; where a BPE or
SentencePiece merge spans the boundary (Alpaca's "Response:" followed by a reply starting with "-" gives the token
":-"), the end of the prompt is dropped from training. Here the prompt is always tokenized alone, and the completion
continues it: jointly tokenized when that keeps the prompt's tokens, else tokenized on its own."""
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..formats.registry import FORMATS, is_conversational
from ..formats.templates import resolve

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of positions that are not trained (transformers' ignore_index)
ANCHOR = "\n"  # tokenized before a standalone completion, then removed: avoids SentencePiece's dummy leading space


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS (text formats) or the chat template's end of turn

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def sequences(self) -> list["TokenizedExample"]:
        """The sequences a trainer runs for this row (a pair: two)."""
        return [self]

    def training_row(self, train_on_inputs: bool) -> dict:
        prompt_labels = self.prompt_ids if train_on_inputs else [IGNORE] * len(self.prompt_ids)
        return {"input_ids": self.prompt_ids + self.completion_ids, "labels": prompt_labels + self.completion_ids}


@dataclass
class TokenizedPair:
    """A preference pair: the prompt once, each reply continuing it as a completion does (TRL's DPO columns)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:  # the longer of the two sequences the pair is trained as
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def sequences(self) -> list[TokenizedExample]:
        return [TokenizedExample(self.prompt_ids, self.chosen_ids), TokenizedExample(self.prompt_ids, self.rejected_ids)]

    def training_row(self, train_on_inputs: bool) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


@dataclass
class TokenizedLabelled:
    """KTO's unpaired row: a completion marked desirable (label True) or not."""
    example: TokenizedExample
    label: bool

    def __len__(self) -> int:
        return len(self.example)

    def sequences(self) -> list[TokenizedExample]:
        return [self.example]

    def training_row(self, train_on_inputs: bool) -> dict:
        return {"prompt_ids": self.example.prompt_ids, "completion_ids": self.example.completion_ids,
                "label": self.label}


Tokenized = TokenizedExample | TokenizedPair | TokenizedLabelled


def tokenize_rows(tokenizer: "PreTrainedTokenizerBase", examples: list[dict], kind: str) -> list[Tokenized | str]:
    """Examples of a format's kind (formats.METHOD_KINDS) tokenized, or the reason each cannot be: a pair is two
    prompt/completion examples sharing the prompt, so both replies are tokenized exactly as SFT tokenizes a response."""
    if kind == "sft":
        return tokenize_examples(tokenizer, examples)
    if kind == "unpaired":
        found = tokenize_examples(tokenizer, [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
        return [row if isinstance(row, str) else TokenizedLabelled(row, e["label"]) for row, e in zip(found, examples)]
    chosen = tokenize_examples(tokenizer, [{"prompt": e["prompt"], "completion": e["chosen"]} for e in examples])
    rejected = tokenize_examples(tokenizer, [{"prompt": e["prompt"], "completion": e["rejected"]} for e in examples])
    pairs = []
    for good, bad in zip(chosen, rejected):
        if isinstance(good, str) or isinstance(bad, str):
            pairs.append(good if isinstance(good, str) else bad)
        elif good.completion_ids == bad.completion_ids:
            pairs.append("chosen equals rejected")
        else:
            pairs.append(TokenizedPair(good.prompt_ids, good.completion_ids, bad.completion_ids))
    return pairs


def tokenize_examples(tokenizer: "PreTrainedTokenizerBase", examples: list[dict]) -> list[TokenizedExample | str]:
    """One TokenizedExample per example, or the reason it cannot be trained on as inference would prompt it."""
    if not examples:
        return []
    if is_conversational(examples[0]):
        return [_chat(tokenizer, e) for e in examples]
    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    fulls = tokenizer([e["prompt"] + e["completion"] for e in examples])["input_ids"]
    return [TokenizedExample(p, _continuation(tokenizer, p, full, e["completion"]) + [tokenizer.eos_token_id])
            for p, full, e in zip(prompts, fulls, examples)]


def starts_with_bos(tokenizer: "PreTrainedTokenizerBase") -> bool:
    """Whether a plain encode (as training does) puts BOS first; the training chat template must then render it."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _continuation(tokenizer, prompt_ids: list[int], full_ids: list[int], completion: str) -> list[int]:
    if full_ids[:len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids):]
    anchor = tokenizer(ANCHOR, add_special_tokens=False)["input_ids"]
    anchored = tokenizer(ANCHOR + completion, add_special_tokens=False)["input_ids"]
    if anchored[:len(anchor)] == anchor:
        return anchored[len(anchor):]
    return tokenizer(completion, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", prompt: str | list) -> list[int]:
    """A prompt's token ids as training tokenized it: text with the tokenizer's special tokens (BOS), a conversation
    rendered by the chat template and tokenized without them (the template writes them itself)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat(tokenizer, example: dict) -> TokenizedExample | str:
    prompt_text = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    if not full_text.startswith(prompt_text):
        return "the chat template renders the conversation differently once the reply is added"
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    return TokenizedExample(prompt_ids, _continuation(tokenizer, prompt_ids, full_ids, full_text[len(prompt_text):]))


def training_chat_template(data, tokenizer: "PreTrainedTokenizerBase") -> str:
    """The chat template a run folder and its exports carry: it renders exactly what training tokenized (the
    format's prompt, the response, EOS), so tools that prompt by chat template prompt the model as it was trained.
    Chat-format runs keep the template they trained with."""
    own = FORMATS[data.format].chat_template(resolve(data.template), starts_with_bos(tokenizer))
    return own or tokenizer.chat_template
