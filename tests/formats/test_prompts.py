"""The training prompt: every row trains on its prompt exactly as inference tokenizes it, and the chat template a run
folder carries renders byte for byte what training rendered."""
import pytest

from helpers import SHARED
from lora_tuner.config.schema import DataSection
from lora_tuner.formats.registry import FORMATS
from lora_tuner.formats.templates import resolve
from lora_tuner.data.tokenize import starts_with_bos, tokenize_examples, training_chat_template
from lora_tuner.model.tokenizer import LlamaTokenizer, byte_tokenizer

SMOLLM2 = SHARED / "models/smollm2-135m-instruct"
CUSTOM = {"with_input": 'Task {{ x }} {% raw %} "quoted" \\ é\n{instruction}\nContext: {input}\nAnswer:',
          "without_input": "Q: {instruction}\nA:"}
ROWS = {  # format -> rows; responses start with '-' so that ':-' merges across the prompt boundary
    "alpaca": [{"instruction": "List two fruits.", "input": "", "output": "- apple\n- pear"},
               {"instruction": "Sort these.", "input": "b, a", "output": "-a, b"}],
    "dolly": [{"instruction": "Summarise.", "context": "A long text.", "response": "- short"}],
}


def tokenizers():
    found = {"bytes": byte_tokenizer}
    if (SHARED / "tokenizers/llama/tokenizer.model").is_file():
        folder = str(SHARED / "tokenizers/llama")
        found["llama-sentencepiece"] = lambda: LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    if SMOLLM2.is_file() or SMOLLM2.is_dir():
        from transformers import AutoTokenizer

        found["smollm2-bpe"] = lambda: AutoTokenizer.from_pretrained(SMOLLM2, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return found


@pytest.fixture(scope="module", params=list(tokenizers()))
def tokenizer(request):
    return tokenizers()[request.param]()


def cases():
    for data_format, rows in ROWS.items():
        for template in ("alpaca", CUSTOM):
            yield data_format, template, rows


@pytest.mark.parametrize("data_format,template,rows", list(cases()),
                         ids=lambda v: v if isinstance(v, str) else ("custom" if isinstance(v, dict) else None))
def test_chat_template_renders_exactly_what_training_rendered(tokenizer, data_format, template, rows):
    data = DataSection(path="x.json", format=data_format, template=template)
    tokenizer.chat_template = training_chat_template(data, tokenizer)
    fmt, bos = FORMATS[data_format], tokenizer.bos_token if starts_with_bos(tokenizer) else ""
    instruction_key, context_key, response_key = ("instruction", "input", "output") if data_format == "alpaca" else \
        ("instruction", "context", "response")
    for row in rows:
        example = fmt.to_example(row, resolve(data.template))
        user = {"role": "user", "content": row[instruction_key], **({"input": row[context_key]} if row[context_key] else {})}
        answer = {"role": "assistant", "content": row[response_key]}
        assert tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False) == bos + example["prompt"]
        assert tokenizer.apply_chat_template([user, answer], tokenize=False) == \
            bos + example["prompt"] + example["completion"] + tokenizer.eos_token
        # and the tokens a chat-template caller sends are the prompt tokens training used (not for SentencePiece:
        # encoding the rendered "<s>Below" drops the word's leading-space marker, as with any template that writes BOS)
        if not isinstance(tokenizer, LlamaTokenizer):
            (trained,) = tokenize_examples(tokenizer, [example])
            prompted = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=True)
            assert prompted["input_ids"] == trained.prompt_ids


def test_chat_runs_keep_the_template_they_trained_with(tokenizer):
    if tokenizer.chat_template is None:
        pytest.skip("this tokenizer ships no chat template")
    own = tokenizer.chat_template
    assert training_chat_template(DataSection(path="x.json", format="chat"), tokenizer) == own


def test_every_row_trains_on_its_prompt_exactly(tokenizer):
    """Where a merge spans the prompt/response boundary (':-' is one token in both real vocabularies), TRL keeps
    the merged token and drops the prompt's end from training; here the prompt keeps its own tokens."""
    examples = [FORMATS["alpaca"].to_example(row, resolve("alpaca")) for row in ROWS["alpaca"]]
    merged_tokens = 0
    for example, tokens in zip(examples, tokenize_examples(tokenizer, examples)):
        assert tokens.prompt_ids == tokenizer(example["prompt"])["input_ids"]  # as inference tokenizes it
        assert tokens.completion_ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(tokens.prompt_ids + tokens.completion_ids[:-1], skip_special_tokens=True)
        assert text.strip() == (example["prompt"] + example["completion"]).strip()
        joint = tokenizer(example["prompt"] + example["completion"])["input_ids"]
        merged_tokens += joint[:len(tokens.prompt_ids)] != tokens.prompt_ids
    if not isinstance(tokenizer, type(byte_tokenizer())):  # the byte tokenizer has no merges at all
        assert merged_tokens, "the rows were meant to cross a merge at the boundary"
