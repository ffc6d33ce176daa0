"""Verification: exports and adapters scored on held-out rows the way training scored them. One owner for merge,
GGUF export and eval: scoring.py computes losses and agreement, streamed.py runs a model a module at a time from
weights read on demand (memory: a few tensors, whatever the model's size), verdict.py decides pass or fail."""

ROWS = 16  # verification rows by default
MAX_LENGTH = 256  # tokens of each, at most
LLAMA_CPP_LOGITS_MAX_BYTES = 2 * 2**30  # GGUF files llama.cpp computes logits for; larger ones are read back streamed
