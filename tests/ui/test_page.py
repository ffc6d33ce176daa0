"""`lora-tune ui` in a real browser: the system's Chromium, driven by playwright, against the page served over tiny
runs made here. Each view's screenshot is written to the test's temporary folder."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from helpers import recipe_dict, write_recipe
from helpers import PROMPTS, trained_run
from lora_tuner import AdapterPool, load_recipe, run
from lora_tuner.eval.evaluate import evaluate
from lora_tuner.run_folder import RunFolder
from lora_tuner.ui.app import create_ui_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine "
                                                   "(apt-get install chromium; .ci/run installs it)")]
KEY = "ui-test-key"


def tiny_run(root, base, data, name, **train):
    recipe = recipe_dict(base, data, train={"max_steps": 20, "logging_steps": 2, "eval_steps": 10, **train},
                         output={"name": name, "root": str(root)})
    return run(load_recipe(write_recipe(root.parent, recipe, f"{name}.yaml")))


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_base, alpaca_file):
    """Two finished runs on one base (one evaluated), served by the ui app over loopback with a key, and beside them
    in the pool an adapter with large random weights, whose answers differ visibly from the base's."""
    root = tmp_path_factory.mktemp("ui") / "adapters"
    root.mkdir()
    base = tiny_base("llama")
    runs = {"alpha": tiny_run(root, base, alpaca_file, "alpha"),
            "beta": tiny_run(root, base, alpaca_file, "beta", learning_rate=1e-3)}
    evaluate(runs["alpha"].folder)
    pool = AdapterPool(base)
    for name, result in runs.items():
        pool.add(name, result.folder)
    pool.add("loud", trained_run(root.parent, base, alpaca_file, "loud", 1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_ui_app(root, pool, api_key=KEY), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "root": root, "pool": pool, "runs": runs,
           "base": base, "data": alpaca_file}
    server.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def browser(site):
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    """A page that has been given the key once, as a user types it into the page's key form."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(site["url"] + "/")
    page.fill("#key input[name=key]", KEY)
    page.click("#key button")
    page.wait_for_selector("#runs tr[data-name]")
    yield page
    page.close()


def metrics(folder) -> list[dict]:
    return RunFolder(folder).metrics()


def test_the_api_takes_the_servers_key(site):
    assert httpx.get(site["url"] + "/ui/api/runs").status_code == 401
    listed = httpx.get(site["url"] + "/ui/api/runs", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {r["name"]: r["state"] for r in listed["runs"]} == {"alpha": "finished", "beta": "finished"}
    assert httpx.get(site["url"] + "/").status_code == 200  # the page itself holds no data


def test_the_runs_table_lists_each_run_with_its_loss_figures(page, site, tmp_path):
    for name, result in site["runs"].items():
        rows = metrics(result.folder)
        row = page.locator(f"#runs tr[data-name={name}]")
        last_loss = [r["loss"] for r in rows if "loss" in r][-1]
        last_eval = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
        assert row.locator("td[data-key=train_loss]").inner_text() == f"{last_loss:.4f}"
        assert row.locator("td[data-key=validation_loss]").inner_text() == f"{last_eval:.4f}"
        assert "finished" in row.inner_text()
    page.click("th[data-key=train_loss]")  # sortable: ascending train loss
    names = page.locator("#runs tr[data-name]").evaluate_all("rows => rows.map(r => r.dataset.name)")
    losses = {name: [r["loss"] for r in metrics(result.folder) if "loss" in r][-1]
              for name, result in site["runs"].items()}
    assert names == sorted(losses, key=losses.get)
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
    print(f"screenshots in {tmp_path}")


def test_a_runs_page_charts_every_logged_row_and_its_evaluation(page, site, tmp_path):
    folder = site["runs"]["alpha"].folder
    page.goto(site["url"] + "/#/run/alpha")
    page.wait_for_selector("body[data-view=run] [data-chart=loss] svg")
    logged = [r for r in metrics(folder) if "loss" in r or "eval_loss" in r]
    assert page.locator("[data-chart=loss] circle.pt").count() == len(logged)
    assert page.locator("table.eval tr").count() == 1 + 2  # header, base, base + adapter
    assert "lora:" in page.locator("#recipe").inner_text()
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)


def test_a_training_runs_chart_gains_points_without_a_reload(page, site, tmp_path):
    recipe = recipe_dict(site["base"], site["data"], train={"max_steps": 100000, "logging_steps": 5, "eval_steps": 10**6,
                                                            "save_steps": 10**6},
                         data={"validation_size": 0}, output={"name": "live", "root": str(site["root"])})
    path = write_recipe(site["root"].parent, recipe, "live.yaml")
    process = subprocess.Popen([sys.executable, "-m", "lora_tuner.cli", "run", path], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        partial = site["root"] / ".live.partial" / RunFolder.METRICS
        while not partial.is_file():  # wait on the run's progress, not on a deadline
            assert process.poll() is None, process.stderr.read()[-2000:]
            time.sleep(0.1)
        page.goto(site["url"] + "/#/run/live")
        page.wait_for_selector("body[data-view=run] [data-chart=loss] circle.pt")
        assert page.locator("h2 .state").inner_text() == "running"
        shown = page.locator("[data-chart=loss] circle.pt").count()
        page.wait_for_function(f"document.querySelectorAll('[data-chart=loss] circle.pt').length > {shown}",
                               timeout=0)  # the page polls metrics.jsonl; nothing reloads it
        page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
    finally:
        process.kill()
        process.wait()
    page.wait_for_function("document.querySelector('h2 .state').textContent === 'failed'", timeout=0)


def test_compare_draws_the_runs_on_one_chart_with_their_evaluations(page, site, tmp_path):
    for name in ("alpha", "beta"):
        page.check(f"#runs tr[data-name={name}] input[type=checkbox]")
    page.click("text=Compare selected")
    page.wait_for_selector("body[data-view=compare] [data-chart=compare_train] svg")
    train = sum(len([r for r in metrics(result.folder) if "loss" in r]) for result in site["runs"].values())
    assert page.locator("[data-chart=compare_train] circle.pt").count() == train
    assert page.locator("[data-chart=compare_train] .legend span").count() == 2
    assert page.locator("[data-run=alpha] table.eval").count() == 1
    assert "not evaluated yet" in page.locator("[data-run=beta]").inner_text()
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)


def test_the_playground_answers_as_the_pool_does(page, site, tmp_path):
    page.goto(site["url"] + "/#/playground")
    page.wait_for_selector("body[data-view=playground] #prompt")
    page.fill("#prompt", PROMPTS[0])
    page.fill("#max_tokens", "12")
    page.check("#models input[value=loud]")
    page.click("#ask")
    answers = {}
    for model in ("base", "alpha", "beta", "loud"):
        column = page.locator(f"#answers > div[data-model={model}][data-done='1']")
        column.wait_for()
        answers[model] = column.locator(".answer").evaluate("node => node.textContent")
        want = site["pool"].generate(PROMPTS[0], adapter=None if model == "base" else model, max_new_tokens=12)
        assert answers[model] == want, model
    assert answers["loud"] and answers["loud"] != answers["base"]  # an adapter that changes the answer, shown as is
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    print(json.dumps({"screenshots": str(tmp_path)}))


# (path, status, fragment of the error message): each answered in OpenAI's error shape, the server unharmed
HOSTILE = [
    ("/ui/api/runs/nosuch", 404, "no run 'nosuch'"),
    ("/ui/api/runs/..%2F..%2Fetc", 404, "no such path"),
    ("/ui/api/runs/.alpha.partial", 404, "no run"),
    ("/ui/api/runs/alpha/metrics?since=abc", 400, "since"),
    ("/ui/static/..%2F..%2Fapp.py", 404, "no such path"),
    ("/v1/nothing", 404, "GET /v1/nothing: no such path"),
    ("/ui/static/index.html", 404, "no file"),  # the page is served at / only
]


@pytest.mark.parametrize("path,status,fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_one_clear_error(site, path, status, fragment):
    answer = httpx.get(site["url"] + path, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == status, answer.text
    assert fragment in answer.json()["error"]["message"]
    assert httpx.get(site["url"] + "/ui/api/runs/alpha/metrics?since=-5",
                     headers={"Authorization": f"Bearer {KEY}"}).json()["count"] == len(metrics(
                         site["runs"]["alpha"].folder))  # and the next request is answered as before


def test_a_slow_view_never_draws_over_a_later_one(page, site):
    held = []  # the run view's first request, answered only after the user has moved on to the playground
    page.route("**/ui/api/runs/alpha", lambda route: held.append(route))
    page.evaluate("location.hash = '#/run/alpha'")
    while not held:
        page.wait_for_timeout(50)
    page.evaluate("location.hash = '#/playground'")
    page.wait_for_selector("body[data-view=playground] #prompt")
    with page.expect_response("**/ui/api/runs/alpha/metrics"):
        held[0].continue_()
    page.evaluate("new Promise((done) => setTimeout(done, 200))")  # the run view's last step: drawing, or not
    assert page.locator("h2").first.inner_text() == "Playground"
    assert page.locator("#prompt").count() == 1
