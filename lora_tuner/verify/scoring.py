"""Scoring models on prompt/completion rows the way training scores them: response tokens only, each row tokenized
as training tokenized it. Used by `lora-tune eval` and by merge/export verification (verdict.py)."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.tokenize import IGNORE, TokenizedExample, tokenize_examples

BATCH_ROWS = 8


@dataclass
class Batch:
    """Rows padded on the right (attention_mask), or packed into one row (position_ids restarting at each)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    scored: torch.Tensor  # bool [rows, length]: positions whose next token is a response token
    targets: torch.Tensor  # those next tokens, in row-major order
    position_ids: torch.Tensor | None = None

    def examples(self):
        """(token ids, scored positions) of each example, whichever the layout."""
        for row, ids in enumerate(self.input_ids):
            if self.position_ids is None:
                length = int(self.attention_mask[row].sum())
                yield ids[:length], self.scored[row, :length]
                continue
            starts = (self.position_ids[row] == 0).nonzero().flatten().tolist() + [len(ids)]
            for start, end in zip(starts, starts[1:]):
                yield ids[start:end], self.scored[row, start:end]


def tokenized_rows(tokenizer, examples: list[dict], max_length: int) -> list[TokenizedExample]:
    """Rows as training tokenized them; rows longer than max_length are cut at its end (a few response tokens lost
    rather than the row)."""
    rows = [row for row in tokenize_examples(tokenizer, examples) if not isinstance(row, str)]
    return [TokenizedExample(r.prompt_ids[:max_length], r.completion_ids[:max(0, max_length - len(r.prompt_ids))])
            for r in rows if len(r.prompt_ids) < max_length]


def scored_tokens(rows: list[TokenizedExample]) -> int:
    """Response tokens these rows score: each is predicted from the position before it, so a response with no
    prompt before it loses its first token (a tokenizer that encodes nothing leaves only EOS, and nothing to score)."""
    return sum(max(len(r.completion_ids) - (0 if r.prompt_ids else 1), 0) for r in rows)


def batches(rows: list[TokenizedExample], pad_id: int, size: int = BATCH_ROWS) -> list[Batch]:
    found = []
    for start in range(0, len(rows), max(size, 1)):
        chunk = [r.training_row(train_on_inputs=False) for r in rows[start:start + max(size, 1)]]
        length = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, r in enumerate(chunk):  # right padding: positions stay 0..n-1 as in training
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        scored = torch.zeros_like(mask, dtype=torch.bool)
        scored[:, :-1] = labels[:, 1:] != IGNORE
        found.append(Batch(ids, mask, scored, labels[:, 1:][labels[:, 1:] != IGNORE]))
    return found


def packed(rows: list[TokenizedExample], pad_id: int, row_tokens: int) -> Batch:
    """All rows in one batch, packed into rows of at most row_tokens tokens (first fit, longest first) with position
    ids restarting at each example, each row filled up by a pad segment of its own: no padding is attended to or
    scored, which matters when every weight is read once per batch (a streamed model), while attention stays
    [rows x row_tokens^2]. Only for models whose attention keeps packed examples apart (model/packing_check.py)."""
    def size(group: list[dict]) -> int:
        return sum(len(r["input_ids"]) for r in group)

    bins: list[list[dict]] = []
    for row in sorted((r.training_row(train_on_inputs=False) for r in rows), key=lambda r: -len(r["input_ids"])):
        place = next((group for group in bins if size(group) + len(row["input_ids"]) <= row_tokens), None)
        if place is None:
            place = []
            bins.append(place)
        place.append(row)
    length = max(size(group) for group in bins)
    ids, positions, scored, targets = [], [], [], []
    for group in bins:
        fill = length - size(group)
        ids.append([token for r in group for token in r["input_ids"]] + [pad_id] * fill)
        positions.append([i for r in group for i in range(len(r["input_ids"]))] + list(range(fill)))
        scored.append([label != IGNORE for r in group for label in r["labels"][1:] + [IGNORE]] + [False] * fill)
        targets += [label for r in group for label in r["labels"][1:] if label != IGNORE]
    return Batch(torch.tensor(ids), None, torch.tensor(scored), torch.tensor(targets, dtype=torch.long),
                 torch.tensor(positions))


@torch.no_grad()
def response_logits(model, batch: Batch) -> torch.Tensor:
    """[scored tokens, vocab] fp32 logits; the LM head runs on those positions only (logits_to_keep)."""
    device = next(model.parameters()).device
    device = torch.device("cpu") if device.type == "meta" else device  # a streamed model (streamed.py) runs on CPU
    layout = ({"attention_mask": batch.attention_mask.to(device)} if batch.position_ids is None
              else {"position_ids": batch.position_ids.to(device)})
    out = model(input_ids=batch.input_ids.to(device), **layout, logits_to_keep=batch.scored.to(device),
                use_cache=False)
    return out.logits.reshape(-1, out.logits.shape[-1]).float().cpu()


def loss(model, rows: list[Batch], desc: str | None = None) -> float:
    """Mean response-token cross-entropy over all rows (token-weighted, as training's loss)."""
    total = count = 0
    for batch in tqdm(rows, desc=desc, unit="batch", leave=False, disable=desc is None):
        logits = response_logits(model, batch)
        total += F.cross_entropy(logits, batch.targets, reduction="sum").item()
        count += len(batch.targets)
    return total / max(count, 1)


def sequence_logps(model, rows: list[Batch], desc: str | None = None) -> list[float]:
    """Each row's summed response-token log-probability, log p(reply | prompt): what DPO's implicit reward compares."""
    found = []
    for batch in tqdm(rows, desc=desc, unit="batch", leave=False, disable=desc is None):
        token_logps = -F.cross_entropy(response_logits(model, batch), batch.targets, reduction="none")
        found += [part.sum().item() for part in token_logps.split(batch.scored.sum(1).tolist())]
    return found


@dataclass
class Agreement:
    tokens: int
    top1_agreement: float  # share of response positions where both models' most likely token is the same
    mean_kl: float  # KL(reference || model) per response token, nats
    max_abs_logit_diff: float
    loss: float
    reference_loss: float


def reference_logits(model, rows: list[Batch], desc: str | None = None) -> list[torch.Tensor]:
    """The model's logits at response positions, batch by batch (what agreement compares)."""
    return [response_logits(model, batch) for batch in tqdm(rows, desc=desc, unit="batch", leave=False,
                                                            disable=desc is None)]


def agreement(found: list[torch.Tensor], reference: list[torch.Tensor], rows: list[Batch]) -> Agreement:
    """Logits at response positions (reference_logits, batch by batch) against the reference's on the same rows."""
    tokens = same = 0
    kl = model_loss = reference_loss = max_diff = 0.0
    for batch, got, want in zip(rows, found, reference):
        tokens += len(batch.targets)
        same += (got.argmax(-1) == want.argmax(-1)).sum().item()
        kl += F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="sum").item()
        model_loss += F.cross_entropy(got, batch.targets, reduction="sum").item()
        reference_loss += F.cross_entropy(want, batch.targets, reduction="sum").item()
        max_diff = max(max_diff, (got - want).abs().max().item() if len(got) else 0.0)
    n = max(tokens, 1)
    return Agreement(tokens, same / n, max(kl / n, 0.0), max_diff, model_loss / n, reference_loss / n)


def perplexity(loss_value: float) -> float:
    return math.exp(min(loss_value, 50.0))
