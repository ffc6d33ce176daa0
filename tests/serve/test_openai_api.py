"""`lora-tune serve`, called the way users call it: the official OpenAI client over loopback. Every answer must equal
AdapterPool.generate for the same adapter and prompt, whether it came alone, streamed, or batched with others."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoModelForCausalLM

from helpers import PROMPTS, QUESTION_TEMPLATE, cli_server, free_port, nan_weights, trained_run
from lora_tuner import AdapterPool
from lora_tuner.serve.openai_api import create_app
from helpers import make_adapter, poison

pytestmark = pytest.mark.slow  # trains adapters: the full tier

KEY = "test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base, alpaca_file):
    """Two adapters trained with different prompt templates (Alpaca's, and a Q:/A: one), served over loopback."""
    tmp = tmp_path_factory.mktemp("serve")
    base = tiny_base("llama")
    a = trained_run(tmp, base, alpaca_file, "a", 1)
    b = trained_run(tmp, base, alpaca_file, "b", 2, template=QUESTION_TEMPLATE)
    pool = AdapterPool(a)
    pool.add("a", a)
    pool.add("b", b)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(pool, api_key=KEY, max_batch=8, max_body=64 * 1024, adapter_root=tmp)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield {"pool": pool, "url": url, "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0),
           "tmp": tmp, "base": base, "a": a}
    server.should_exit = True
    thread.join()


def expected(pool, prompt, adapter, chat, max_tokens=12):
    """What the pool gives on its own: chat in the adapter's training prompt, completions on the raw text."""
    return pool.generate(prompt, adapter=adapter, template=chat, max_new_tokens=max_tokens)


def complete(client, model, prompt, chat, max_tokens=12, **kwargs):
    if chat:
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, **kwargs)
        return answer.choices[0].message.content, answer.choices[0].finish_reason
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)
    return answer.choices[0].text, answer.choices[0].finish_reason


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_each_model_answers_as_the_pool_does(served, chat):
    pool, client = served["pool"], served["client"]
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    got = {}
    for model, adapter in (("a", "a"), ("b", "b"), ("base", None)):
        text, reason = complete(client, model, PROMPTS[0], chat)
        assert text == expected(pool, PROMPTS[0], adapter, chat), model
        assert reason in ("stop", "length")
        got[model] = text
    assert len(set(got.values())) == 3, got  # three different models answered


def test_chat_renders_each_adapters_training_prompt(served):
    pool = served["pool"]
    message = [{"role": "user", "content": PROMPTS[1]}]
    assert pool.chat_ids(message, "a") == pool.prompt_ids(PROMPTS[1], "a")
    assert pool.chat_ids(message, "b") == pool.prompt_ids(PROMPTS[1], "b")
    assert pool.tokenizer.decode(pool.chat_ids(message, "b"), skip_special_tokens=True) == f"Q: {PROMPTS[1]}\nA:"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_yields_the_same_text(served, chat):
    client = served["client"]
    whole, _ = complete(client, "b", PROMPTS[2], chat, max_tokens=16)
    if chat:
        stream = client.chat.completions.create(model="b", messages=[{"role": "user", "content": PROMPTS[2]}],
                                                max_tokens=16, temperature=0, stream=True)
        chunks = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stream]
    else:
        stream = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True)
        chunks = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
    assert "".join(text for text, _ in chunks) == whole
    assert sum(bool(text) for text, _ in chunks) > 1  # it really streamed
    assert chunks[-1][1] in ("stop", "length") and all(reason is None for _, reason in chunks[:-1])


def test_concurrent_clients_get_their_own_adapter(served):
    client, url = served["client"], served["url"]
    jobs = [(model, PROMPTS[i % len(PROMPTS)], i % 2 == 0) for i, model in enumerate(["a", "b", "base"] * 3)][:8]
    alone = [complete(client, *job)[0] for job in jobs]  # one client at a time
    before = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    together, start = [None] * len(jobs), threading.Barrier(len(jobs))

    def client_thread(i):
        start.wait()
        together[i] = complete(client, *jobs[i])[0]

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert together == alone
    calls = after["generate_calls"] - before["generate_calls"]
    assert after["requests_served"] - before["requests_served"] == len(jobs)
    assert calls < len(jobs), "concurrent requests were not batched together"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    client, url = served["client"], served["url"]
    with pytest.raises(openai.NotFoundError) as error:
        complete(client, "nope", PROMPTS[0], chat=True)
    assert error.value.body["code"] == "model_not_found" and "served: base, a, b" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, "a", PROMPTS[0], chat=False, max_tokens=100_000)
    assert error.value.body["code"] == "context_length_exceeded" and "512" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="a", messages=[], max_tokens=4)
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "  "}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="instruction/response pairs"):
        client.chat.completions.create(model="a", max_tokens=4, messages=[{"role": "system", "content": "Be brief"},
                                                                          {"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError) as error:  # a text part whose text is not text
        client.chat.completions.create(model="a", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert "messages" in error.value.body["param"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    bad_json = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "a", "messages": [',
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["message"] == "the body is not valid JSON"
    text, _ = complete(client, "a", PROMPTS[0], chat=True)  # still serving, and correctly
    assert text == expected(served["pool"], PROMPTS[0], "a", chat=True)


def test_a_failing_adapter_fails_only_its_own_requests(served):
    """A batch where one adapter's logits are NaN (sampling fails inside generate): the healthy request in the same
    batch is answered (retried alone), the bad one gets a 500, and every later request is served as before."""
    client, pool = served["client"], served["pool"]
    pool.add("poisoned", served["a"])
    poison(pool, "poisoned")
    results, start = {}, threading.Barrier(2)

    def request(model):
        start.wait()
        try:
            results[model] = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0.7)
        except openai.APIStatusError as error:
            results[model] = error

    threads = [threading.Thread(target=request, args=(model,)) for model in ("a", "poisoned")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert isinstance(results["poisoned"], openai.InternalServerError), results["poisoned"]
        assert results["a"].choices[0].finish_reason in ("stop", "length")
        for model, chat in (("base", False), ("a", True), ("b", False)):
            assert complete(client, model, PROMPTS[1], chat)[0] == expected(pool, PROMPTS[1], None if model == "base"
                                                                            else model, chat)
    finally:
        pool.remove("poisoned")


def test_adapters_are_added_and_removed_at_run_time(served, tiny_base):
    client, url, pool = served["client"], served["url"], served["pool"]
    headers = {"Authorization": f"Bearer {KEY}"}
    added = httpx.post(f"{url}/v1/adapters", json={"path": served["a"], "name": "a_again"}, headers=headers)
    assert added.status_code == 200, added.text
    assert "a_again" in [m.id for m in client.models.list().data]
    assert complete(client, "a_again", PROMPTS[3], chat=True)[0] == expected(pool, PROMPTS[3], "a", chat=True)
    assert httpx.post(f"{url}/v1/adapters", json={"path": served["a"], "name": "a_again"},
                      headers=headers).status_code == 409
    assert httpx.delete(f"{url}/v1/adapters/a_again", headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "a_again", PROMPTS[3], chat=True)
    assert httpx.delete(f"{url}/v1/adapters/a_again", headers=headers).status_code == 404
    gptj = make_adapter(tiny_base("gptj"), served["tmp"] / "gptj", 1)
    refused = httpx.post(f"{url}/v1/adapters", json={"path": gptj}, headers=headers)
    assert refused.status_code == 400
    assert "belongs to another model" in refused.json()["error"]["message"]
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]


def test_a_shared_server_keeps_to_its_limits(served, tmp_path):
    """Body size, keys, what /health tells a stranger, where adapters may be loaded from, prompts too long to fit."""
    client, url = served["client"], served["url"]
    headers = {"Authorization": f"Bearer {KEY}"}
    huge = httpx.post(f"{url}/v1/completions", content=b"x" * (65 * 1024), headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"  # before the 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": KEY}).status_code == 401  # Bearer is required
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # nothing about what is served without the key
    assert httpx.get(f"{url}/health", headers=headers).json()["adapters"] == ["a", "b"]
    outside = make_adapter(served["base"], tmp_path / "elsewhere", 1)
    refused = httpx.post(f"{url}/v1/adapters", json={"path": outside}, headers=headers)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "path_not_allowed"
    with pytest.raises(openai.BadRequestError, match="characters, more than") as error:
        client.completions.create(model="a", prompt="x" * 60_000, max_tokens=2)
    assert error.value.body["code"] == "context_length_exceeded"
    assert complete(client, "a", PROMPTS[0], chat=True)[0] == expected(served["pool"], PROMPTS[0], "a", chat=True)


def test_a_non_ascii_key_is_accepted_and_an_empty_one_refused(served):
    pool = served["pool"]
    key = "clé-sécrète"
    app = create_app(pool, api_key=key)
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        good = test_client.get("/v1/models", headers={"Authorization": f"Bearer {key}".encode()})
        bad = test_client.get("/v1/models", headers={"Authorization": "Bearer cle-secrete"})
    assert good.status_code == 200 and bad.status_code == 401
    done = subprocess.run([sys.executable, "-m", "lora_tuner.cli", "serve", "--adapter", served["a"], "--api-key", " "],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--api-key: is empty" in done.stderr


def test_the_command_serves_on_loopback(served):
    port = free_port()
    with cli_server(["serve", "--adapter", served["a"]], port):
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["adapters"] == ["a"] and health["base"] == "base"
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening, listening
    nothing = subprocess.run([sys.executable, "-m", "lora_tuner.cli", "serve"], capture_output=True, text=True)
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == ("error: serve: --adapter: nothing to serve; give --adapter DIR (repeatable) "
                                      "and/or --base MODEL")


def adapter_under_root(served, name, edit=None) -> str:
    """An adapter folder where the server may load from (its --adapter-root), edited the way a careless or hostile
    client would leave it."""
    folder = served["tmp"] / "hostile" / name
    if not folder.exists():
        make_adapter(served["base"], folder, 3)
        if edit:
            edit(folder)
    return str(folder)


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return edit


def run_linked_to_a_secret(served) -> str:
    """A run folder whose recipe.yaml is a link to a file the client wants to read through the error messages."""
    folder = served["tmp"] / "hostile" / "linked"
    if not folder.exists():
        shutil.copytree(served["a"], folder)
        secret = folder.parent / "secret.txt"
        secret.write_text("top-secret-line: hunter2\n")
        (folder / "recipe.yaml").unlink()
        (folder / "recipe.yaml").symlink_to(secret)
    return str(folder)


AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": "a", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "a", "max_tokens": 2}

# id -> (method, path, request builder (served) -> httpx kwargs, status, error code or a fragment of the message);
# after each, nothing new is listed and every model still answers exactly as the pool does
SERVER_CASES = {
    "no-key": ("GET", "/v1/models", lambda s: {}, 401, "invalid_api_key"),
    "key-without-bearer": ("GET", "/v1/models", lambda s: {"headers": {"Authorization": KEY}}, 401, "invalid_api_key"),
    "wrong-key": ("GET", "/v1/models", lambda s: {"headers": {"Authorization": "Bearer nope"}}, 401, "invalid_api_key"),
    "body-too-large-before-the-key": ("POST", "/v1/completions", lambda s: {"content": b"x" * (65 * 1024)}, 413,
                                      "body_too_large"),
    "body-not-json": ("POST", "/v1/completions", lambda s: {"content": b"{\"model\": ", "headers": {
        **AUTH, "Content-Type": "application/json"}}, 400, "not valid JSON"),
    "body-without-content-type": ("POST", "/v1/completions", lambda s: {"content": json.dumps(COMPLETION).encode(),
                                                                        "headers": AUTH}, 400, "must be a JSON object"),
    "body-a-list": ("POST", "/v1/completions", lambda s: {"json": [COMPLETION], "headers": AUTH}, 400,
                    "must be a JSON object"),
    "unknown-model": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "model": "nope"}, "headers": AUTH},
                      404, "model_not_found"),
    "max-tokens-zero": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "max_tokens": 0}, "headers": AUTH},
                        400, "max_tokens"),
    "max-tokens-past-context": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "max_tokens": 10**6},
                                                                      "headers": AUTH}, 400, "context_length_exceeded"),
    "prompt-past-context": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "prompt": "x" * 60_000},
                                                                  "headers": AUTH}, 400, "context_length_exceeded"),
    "temperature-negative": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "temperature": -1},
                                                                   "headers": AUTH}, 400, "temperature"),
    "top-p-zero": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "top_p": 0}, "headers": AUTH}, 400,
                   "top_p"),
    "n-two": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "n": 2}, "headers": AUTH}, 400, "n"),
    "prompt-a-number": ("POST", "/v1/completions", lambda s: {"json": {**COMPLETION, "prompt": 5}, "headers": AUTH},
                        400, "prompt"),
    "no-messages": ("POST", "/v1/chat/completions", lambda s: {"json": {**CHAT, "messages": []}, "headers": AUTH}, 400,
                    "messages"),
    "blank-user-message": ("POST", "/v1/chat/completions", lambda s: {"json": {**CHAT, "messages": [
        {"role": "user", "content": "  "}]}, "headers": AUTH}, 400, "no user message"),
    "unknown-role": ("POST", "/v1/chat/completions", lambda s: {"json": {**CHAT, "messages": [
        {"role": "root", "content": "hi"}]}, "headers": AUTH}, 400, "role"),
    "text-part-a-number": ("POST", "/v1/chat/completions", lambda s: {"json": {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]}, "headers": AUTH}, 400, "messages"),
    "image-part": ("POST", "/v1/chat/completions", lambda s: {"json": {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "headers": AUTH},
        400, "only text content parts"),
    "add-outside-the-root": ("POST", "/v1/adapters", lambda s: {"json": {"path": "/etc"}, "headers": AUTH}, 403,
                             "path_not_allowed"),
    "add-a-missing-folder": ("POST", "/v1/adapters", lambda s: {"json": {"path": str(s["tmp"] / "nowhere")},
                                                                "headers": AUTH}, 400, "adapter_not_loadable"),
    "add-under-a-served-name": ("POST", "/v1/adapters", lambda s: {"json": {"path": s["a"], "name": "b"},
                                                                   "headers": AUTH}, 409, "adapter_exists"),
    "add-as-the-base": ("POST", "/v1/adapters", lambda s: {"json": {"path": s["a"], "name": "base"}, "headers": AUTH},
                        409, "adapter_exists"),
    "add-a-name-not-an-identifier": ("POST", "/v1/adapters", lambda s: {"json": {"path": s["a"], "name": "../x"},
                                                                        "headers": AUTH}, 400, "not a plain identifier"),
    "add-with-unknown-fields": ("POST", "/v1/adapters", lambda s: {"json": {"path": s["a"], "trust": True},
                                                                   "headers": AUTH}, 400, "trust"),
    "add-nan-weights": ("POST", "/v1/adapters", lambda s: {"json": {"path": adapter_under_root(s, "nan", nan_weights)},
                                                           "headers": AUTH}, 400, "adapter_not_loadable"),
    "add-rank-as-text": ("POST", "/v1/adapters", lambda s: {"json": {"path": adapter_under_root(
        s, "rank_text", edit_config(r="sixteen"))}, "headers": AUTH}, 400, "adapter_not_loadable"),
    "add-rank-not-its-tensors": ("POST", "/v1/adapters", lambda s: {"json": {"path": adapter_under_root(
        s, "rank_off", edit_config(r=4))}, "headers": AUTH}, 400, "adapter_not_loadable"),
    "add-dora": ("POST", "/v1/adapters", lambda s: {"json": {"path": adapter_under_root(
        s, "dora", edit_config(use_dora=True))}, "headers": AUTH}, 400, "use_dora"),
    "add-recipe-linked-to-a-secret": ("POST", "/v1/adapters", lambda s: {"json": {"path": run_linked_to_a_secret(s)},
                                                                         "headers": AUTH}, 400, "a link to a file outside"),
    "delete-an-unknown-adapter": ("DELETE", "/v1/adapters/nope", lambda s: {"headers": AUTH}, 404, "model_not_found"),
    "delete-the-base": ("DELETE", "/v1/adapters/base", lambda s: {"headers": AUTH}, 404, "model_not_found"),
    "delete-without-the-key": ("DELETE", "/v1/adapters/a", lambda s: {}, 401, "invalid_api_key"),
    # DNS rebinding: another site's name resolving to 127.0.0.1, sent as Host, with or without the key
    "host-of-another-site": ("POST", "/v1/completions", lambda s: {"json": COMPLETION, "headers": {
        **AUTH, "Host": "attacker.example"}}, 403, "host_not_allowed"),
    "host-of-another-site-with-our-port": ("GET", "/v1/models", lambda s: {"headers": {
        "Host": f"attacker.example:{s['url'].rsplit(':', 1)[1]}"}}, 403, "host_not_allowed"),
    "host-that-only-starts-like-loopback": ("GET", "/health", lambda s: {"headers": {"Host": "127.0.0.1.nip.io"}},
                                            403, "host_not_allowed"),
    "add-adapter-of-another-base": ("POST", "/v1/adapters", lambda s: {"json": {"path": adapter_under_root(
        s, "other_size", other_size_adapter)}, "headers": AUTH}, 400, "adapter_not_loadable"),
}


def other_size_adapter(folder):
    """The adapter saved over with one of a wider model: its tensors fit no module of this base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from helpers import CONFIGS

    wide = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**CONFIGS["llama"], "hidden_size": 96}))
    get_peft_model(wide, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(folder)


@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_hostile_requests_get_an_openai_error_and_change_nothing(served, case):
    method, path, build, status, expected_text = SERVER_CASES[case]
    url = served["url"]
    response = httpx.request(method, url + path, **build(served))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if expected_text:
        assert expected_text in (error["code"] or "") or expected_text in error["message"] or \
            expected_text == error["param"], error
    assert "Traceback" not in response.text and "hunter2" not in response.text
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]] == ["base", "a", "b"]
    for model in ("base", "a"):  # every model still answers as the pool does
        assert complete(served["client"], model, PROMPTS[2], chat=False, max_tokens=4)[0] == expected(
            served["pool"], PROMPTS[2], None if model == "base" else model, chat=False, max_tokens=4)
