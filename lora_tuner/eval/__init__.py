"""Evaluation: held-out response loss of base, adapter and exports (`lora-tune eval`), and the scoring that merge
verification shares."""
