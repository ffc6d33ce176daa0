"""The run folder's one tolerant reader, held by the page that lists every run: a run whose files a kill tore, that a
user broke or linked out of the folder is shown as damaged (or its torn last line skipped and counted) and never
stops the list, the page, `lora-tune ui` itself or any other run; nothing outside the folder is ever served."""
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from helpers import cli_server, free_port
from lora_tuner import AdapterPool
from lora_tuner.run_folder import RunFolder

pytest.importorskip("fastapi")
SECRET = "the contents of a file outside every run folder"


def torn_metrics(run: Path) -> None:
    with (run / "metrics.jsonl").open("a") as out:
        out.write('{"step": 99, "lo')  # what a killed writer leaves


def nan_metrics(run: Path) -> None:
    with (run / "metrics.jsonl").open("a") as out:
        out.write(json.dumps({"step": 5, "loss": float("nan"), "eval_loss": float("inf")}) + "\n")


def link_out(name: str):
    def edit(run: Path) -> None:
        secret = run.parent.parent / "secret.txt"
        secret.write_text(SECRET)
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(secret)
    return edit


def fifo(name: str):
    return lambda run: ((run / name).unlink(missing_ok=True), os.mkfifo(run / name))


def write(name: str, content: str):
    return lambda run: (run / name).write_text(content)


# folder name -> (edit, state the page shows, fragment of the reason shown)
RUNS = {
    "a-good": (None, "finished", None),
    "torn-metrics": (torn_metrics, "finished", None),
    "nan-metrics": (nan_metrics, "finished", None),
    "corrupt-manifest": (write("run.json", '{"name": "x", "trunc'), "damaged", "run.json"),
    "corrupt-recipe": (write("recipe.yaml", "model: [unclosed"), "damaged", "YAML syntax error"),
    "corrupt-eval": (write("eval.json", "{not json"), "damaged", "eval.json"),
    "deep-eval": (write("eval.json", "[" * 50_000 + "]" * 50_000), "damaged", "nested too deeply"),
    "metrics-not-utf8": (lambda run: (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": "\xff"}\n'),
                         "damaged", "not UTF-8"),
    "linked-eval-md": (link_out("eval.md"), "damaged", "link to a file outside"),
    "linked-metrics": (link_out("metrics.jsonl"), "damaged", "link to a file outside"),
    "fifo-eval-md": (fifo("eval.md"), "damaged", "not a regular file"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_run) -> Path:
    root = tmp_path_factory.mktemp("ui-damaged") / "adapters"
    root.mkdir()
    for name, (edit, _, _) in RUNS.items():
        folder = Path(shutil.copytree(tiny_run, root / name))
        (folder / "eval.md").write_text("# Evaluation\n")
        if edit:
            edit(folder)
    shutil.copytree(tiny_run, root / os.fsdecode(b"caf\xe9"))  # a folder name that is not UTF-8
    partial = root / ".half.partial"
    partial.mkdir()
    (partial / "recipe.yaml").write_text("\x00garbage: [")
    return root


@pytest.fixture(scope="module")
def client(root, tiny_base):
    from fastapi.testclient import TestClient

    from lora_tuner.ui.app import create_ui_app

    app = create_ui_app(root, AdapterPool(tiny_base("llama")))
    with TestClient(app, base_url="http://127.0.0.1:8080") as test_client:
        yield test_client


def test_every_run_is_listed_and_each_damaged_one_says_why(client):
    answer = client.get("/ui/api/runs")
    assert answer.status_code == 200 and SECRET not in answer.text
    listed = {run["name"]: run for run in answer.json()["runs"]}
    for name, (_, state, why) in RUNS.items():
        assert listed[name]["state"] == state, (name, listed[name])
        if why:
            assert why in listed[name]["problem"], (name, listed[name]["problem"])
    assert listed["caf\ufffd"]["state"] == "damaged" and "not UTF-8" in listed["caf\ufffd"]["problem"]
    assert listed["half"]["state"] == "damaged"
    assert listed["nan-metrics"]["train_loss"] is None  # NaN is not JSON: shown as no value


def test_a_torn_last_line_is_skipped_and_counted(client, tiny_run):
    rows = RunFolder(tiny_run).metrics()
    found = client.get("/ui/api/runs/torn-metrics/metrics").json()
    assert found["count"] == len(rows) and found["torn"] == 1 and found["rows"] == rows


@pytest.mark.parametrize("name", [name for name, (_, state, _) in RUNS.items() if state == "damaged"])
def test_a_damaged_runs_own_views_say_why_and_serve_nothing_from_outside(client, name):
    for path in (f"/ui/api/runs/{name}", f"/ui/api/runs/{name}/metrics"):
        answer = client.get(path)
        assert answer.status_code == 200 and SECRET not in answer.text, path
        assert answer.json()["state"] == "damaged" and RUNS[name][2] in answer.json()["problem"], answer.json()
    assert client.get("/ui/api/runs/a-good").json()["state"] == "finished"  # and every other run as before


@pytest.mark.parametrize("host,status", [("evil.example", 403), ("evil.example:8080", 403), ("127.0.0.1.evil", 403),
                                         ("localhost:8080", 200), ("127.0.0.1", 200), ("[::1]:8080", 200)])
def test_a_loopback_server_answers_only_requests_addressed_to_loopback(client, host, status):
    """DNS rebinding: a page on another site whose name resolves to 127.0.0.1 sends its own name as Host."""
    answer = client.get("/ui/api/runs", headers={"host": host})
    assert answer.status_code == status, answer.text
    if status == 403:
        assert answer.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.slow
def test_lora_tune_ui_starts_over_damaged_runs_and_serves_the_good_ones(root):
    """The first runs in name order are damaged: the page still starts, on the first run that reads back whole."""
    port = free_port()
    with cli_server(["ui", str(root)], port, ready="/ui/api/runs"):
        listed = httpx.get(f"http://127.0.0.1:{port}/ui/api/runs").json()
        assert "a_good" in listed["served"] and "corrupt_manifest" not in listed["served"]
        assert len(listed["runs"]) == len(RUNS) + 2


def test_eval_scores_the_rows_before_a_torn_last_line(tiny_run, tmp_path):
    from lora_tuner.eval.evaluate import evaluate

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    examples, held_out = RunFolder(run).validation_examples()
    with (run / "validation.jsonl").open("a") as out:
        out.write('{"row": 400, "held_out": true, "prompt": "Rev')
    assert RunFolder(run).read_jsonl("validation.jsonl").torn == 1
    assert RunFolder(run).validation_examples() == (examples, held_out)
    report = evaluate(run)
    assert report.rows == len(examples) and report.held_out
