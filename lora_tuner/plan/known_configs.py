"""Configs of the bundled recipes' bases, so `lora-tune plan` works offline (they are the public config.json
fields that matter for size; anything else is read with AutoConfig when it is on disk or in the hub cache)."""
KNOWN = {
    "huggyllama/llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "EleutherAI/gpt-j-6b": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                                vocab_size=50400, n_positions=2048, tie_word_embeddings=False),
}

# Their linear layers' names (what lora.target_modules may name), so a bundled recipe is validated without importing
# transformers to build the model (tests/test_plan.py checks them against the models transformers builds).
KNOWN_LINEARS = {
    "huggyllama/llama-7b": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "EleutherAI/gpt-j-6b": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "lm_head"),
}


def known_positions(name: str) -> int:
    """A known base's context length, read without building its config (that imports transformers and torch)."""
    fields = KNOWN[name]
    return fields["max_position_embeddings"] if "max_position_embeddings" in fields else fields["n_positions"]


# Measured on ../shared/data/alpaca_5000.json with the LLaMA tokenizer and the Alpaca template: tokens per row (prompt,
# response, EOS) and the share of them that is response (what the loss and the LM head run on).
KNOWN_DATA = {"tatsu-lab/alpaca": dict(rows=52002, tokens_per_row=128, response_share=0.52)}
