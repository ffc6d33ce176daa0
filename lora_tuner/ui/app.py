"""`lora-tune ui`: one local page over an adapters folder. It is `serve`'s app (the OpenAI-compatible endpoint over an
AdapterPool, with its key handling) plus the page's static files and a small read-only JSON API over the run folders
(runs.py). The page's playground asks /v1/chat/completions, so it is answered by exactly the code `serve` runs."""
from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse

from ..adapters.pool import AdapterPool
from ..serve.openai_api import APIError, create_app
from . import runs

STATIC = Path(str(files("lora_tuner.ui") / "static"))
PAGES = {"app.js": "text/javascript", "style.css": "text/css"}


def create_ui_app(root: Path, pool: AdapterPool, base_name: str = "base", api_key: str | None = None,
                  max_batch: int = 8, host: str = "127.0.0.1") -> FastAPI:
    app = create_app(pool, base_name=base_name, api_key=api_key, max_batch=max_batch, host=host)
    authorized = [Depends(app.state.authorize)]

    def folder(name: str):
        found = runs.run_folders(root).get(name)
        if found is None:
            raise APIError(404, f"no run {name!r} under {str(root)!r}", "name", "run_not_found")
        return found

    @app.get("/", include_in_schema=False)
    async def page():  # the page holds no data: everything it shows comes through the key-checked API below
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in PAGES:
            raise APIError(404, f"no file {name!r}", "name")
        return FileResponse(STATIC / name, media_type=PAGES[name])

    @app.get("/ui/api/runs", dependencies=authorized)
    async def run_list():
        return {"root": runs.shown_name(str(root)), "base": base_name, "served": pool.names,
                "runs": [runs.listed(name, found) for name, found in runs.run_folders(root).items()]}

    @app.get("/ui/api/runs/{name}", dependencies=authorized)
    async def run_detail(name: str):
        return runs.detail(name, folder(name))

    @app.get("/ui/api/runs/{name}/metrics", dependencies=authorized)
    async def run_metrics(name: str, since: int = 0):
        return runs.metrics(folder(name), since)

    return app
