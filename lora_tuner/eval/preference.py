"""The preference half of `lora-tune eval` on a DPO or KTO run: on held-out pairs, how often each model's implicit
reward prefers the chosen reply, and by how much.

DPO's implicit reward of a reply y to a prompt x is beta * (log p_model(y|x) - log p_reference(y|x)), with the run's
own beta and reference. A pair counts as preferred when the chosen reply's reward is the higher one, and half when the
two tie: the reference itself scores exactly 50% (TRL's training metric counts ties as misses, so it starts at 0%)."""
from dataclasses import dataclass

from ..data.tokenize import TokenizedExample, TokenizedPair, tokenize_rows
from ..verify.scoring import batches, sequence_logps


@dataclass
class PairLogps:
    chosen: list[float]  # log p(chosen | prompt) per pair
    rejected: list[float]


@dataclass
class PreferenceScore:
    accuracy: float  # share of pairs whose chosen reply has the higher implicit reward (ties: half)
    margin: float  # mean reward of chosen minus rejected


def tokenized_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[TokenizedPair]:
    """The pairs as training tokenized them; pairs training would drop (too long, identical replies) are left out."""
    found = tokenize_rows(tokenizer, pairs, "pairs")
    return [pair for pair in found if isinstance(pair, TokenizedPair) and len(pair) <= max_length]


def pair_logps(model, pairs: list[TokenizedPair], pad_id: int, desc: str) -> PairLogps:
    def replies(key: str):
        return batches([TokenizedExample(p.prompt_ids, getattr(p, key)) for p in pairs], pad_id)

    return PairLogps(sequence_logps(model, replies("chosen_ids"), desc=f"{desc}: chosen"),
                     sequence_logps(model, replies("rejected_ids"), desc=f"{desc}: rejected"))


def preference_score(model: PairLogps, reference: PairLogps, beta: float) -> PreferenceScore:
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in
               zip(model.chosen, model.rejected, reference.chosen, reference.rejected)]
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return PreferenceScore(wins / max(len(margins), 1), sum(margins) / max(len(margins), 1))
