"""The OpenAI-compatible HTTP API over an AdapterPool: `model` picks the adapter (or the bare base), chat messages are
rendered with the adapter's training prompt, `stream: true` answers with server-sent events. FastAPI does the HTTP,
validation and streaming; this module maps requests to Batcher jobs and errors to OpenAI's error shape."""
import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field

from ..adapters.compat import adapter_name
from ..adapters.pool import AdapterPool
from ..errors import UserError
from .batcher import Batcher, Done, Failed, Job, Sampling, Text
from .hosts import HostCheck, is_loopback

DEFAULT_MAX_TOKENS = 256  # chat requests without max_tokens; OpenAI's completions default is 16
DEFAULT_MAX_BODY = 4 * 2**20  # bytes of a request body; a context of 2,048 tokens is ~10 KB of text


class BodyLimit:
    """Bodies over max_bytes are answered 413 before they are read (Content-Length) or as soon as they pass the
    limit (chunked): FastAPI reads any body whole, before authentication."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"the request body is over {self.max_bytes:,} bytes (--max-body)",
                                     "type": "invalid_request_error", "param": None, "code": "body_too_large"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


class BodyTooLarge(Exception):
    pass


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


class Generation(BaseModel):
    """Fields both endpoints share; fields OpenAI has and this server ignores (user, logprobs=false, ...) pass."""
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class CompletionRequest(Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """Content parts ([{"type": "text", "text": ...}]) joined; other part types are refused."""
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" for part in self.content):
            raise APIError(400, "only text content parts are supported", "messages")
        return "".join(part.text for part in self.content)


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None


class OpenAIServer:
    """The endpoints' shared state and checks: the pool, the batcher that generates for it, the key, the context."""

    def __init__(self, pool: AdapterPool, base_name: str, api_key: str | None, max_batch: int,
                 context_length: int | None, adapter_root: Path | None):
        self.pool, self.base_name, self.api_key, self.adapter_root = pool, base_name, api_key, adapter_root
        self.batcher = Batcher(pool, max_batch=max_batch)
        self.context = context_length or getattr(pool.model.config, "max_position_embeddings", None)
        self.allowed = {path.resolve() for path in pool.paths.values()}
        # no token is longer than this, so a text of more than context * this characters cannot fit the context
        self.longest_token = max((len(pool.tokenizer.decode([i])) for i in range(len(pool.tokenizer))), default=1) or 1

    # checks
    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # HTTP headers arrive as latin-1 text; the key's UTF-8 bytes are what a client sent
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode("latin-1", "replace"),
                                                                     self.api_key.encode("utf-8"))

    def authorize(self, request: Request) -> None:
        if not self.authorized(request):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           kind="authentication_error")

    def fits_context(self, text: str, param: str) -> str:
        """Refused before it is tokenized when it cannot fit: a huge prompt would hold a worker for seconds."""
        if self.context is not None and len(text) > self.context * self.longest_token:
            raise APIError(400, f"this model's context is {self.context} tokens; the {param} has {len(text):,} "
                           "characters, more than that many tokens can hold", param, "context_length_exceeded")
        return text

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model not in self.pool.names:
            raise APIError(404, f"the model {model!r} does not exist; served: "
                           f"{', '.join([self.base_name, *self.pool.names])}", "model", "model_not_found")
        return model

    def job(self, body: Generation, ids: list[int], adapter: str | None, max_tokens: int, param: str) -> Job:
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; the request has {len(ids)} prompt "
                           f"tokens and asks for {max_tokens} more: shorten the prompt or lower max_tokens",
                           param, "context_length_exceeded")
        queued = Job(ids, adapter, max_tokens, body.stops(), Sampling(body.temperature, body.top_p),
                     asyncio.get_running_loop(), asyncio.Queue())
        self.batcher.submit(queued)
        return queued

    # endpoints
    async def health(self, request: Request):
        if not self.authorized(request):  # alive, and nothing about what is served
            return {"status": "ok"}
        return {"status": "ok", "base": self.base_name, "adapters": self.pool.names, "queued": self.batcher.queued,
                "generate_calls": self.batcher.calls, "requests_served": self.batcher.rows}

    async def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lora-tune"}
                                           for name in [self.base_name, *self.pool.names]]}

    async def completions(self, body: CompletionRequest):
        adapter = self.adapter_for(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "one prompt per request (send several requests: they are batched together)",
                           "prompt")
        ids = await asyncio.to_thread(self.pool.prompt_ids, self.fits_context(prompts[0], "prompt"), adapter,
                                      template=False)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        return await answer(self.job(body, ids, adapter, body.max_tokens, "prompt"), body, chat=False)

    async def chat_completions(self, body: ChatRequest):
        adapter = self.adapter_for(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self.fits_context("".join(m["content"] for m in messages), "messages")
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise APIError(400, "messages hold no user message with content", "messages")
        try:
            ids = await asyncio.to_thread(self.pool.chat_ids, messages, adapter)
        except TemplateError as exc:
            raise APIError(400, f"{body.model}: {exc}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        return await answer(self.job(body, ids, adapter, max_tokens, "messages"), body, chat=True)

    async def add_adapter(self, body: AdapterRequest):
        folder = Path(body.path).expanduser().resolve()
        root = self.adapter_root
        if folder not in self.allowed and not (root and folder.is_relative_to(root.resolve())):
            raise APIError(403, "adapters are added from under --adapter-root only (or the folders served at start)",
                           "path", "path_not_allowed")
        name = body.name or adapter_name(body.path)
        if name == self.base_name or name in self.pool.names:
            raise APIError(409, f"{name!r} is already served; DELETE /v1/adapters/{name} first, or pick another "
                           "name", "name", "adapter_exists")
        try:
            await asyncio.to_thread(self.pool.add, name, folder)
        except UserError as exc:
            raise APIError(400, str(exc), "path", "adapter_not_loadable") from None
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lora-tune"}

    async def remove_adapter(self, name: str):
        if name not in self.pool.names:
            raise APIError(404, f"no adapter {name!r} is served", "name", "model_not_found")
        await asyncio.to_thread(self.pool.remove, name)
        return {"id": name, "object": "model", "deleted": True}


def create_app(pool: AdapterPool, base_name: str = "base", api_key: str | None = None, max_batch: int = 8,
               context_length: int | None = None, max_body: int = DEFAULT_MAX_BODY,
               adapter_root: Path | None = None, host: str = "127.0.0.1") -> FastAPI:
    """adapter_root: POST /v1/adapters loads only folders under it, or those the pool held at start. host: the
    address the server binds; on loopback, requests must name a loopback host (HostCheck)."""
    server = OpenAIServer(pool, base_name, api_key, max_batch, context_length, adapter_root)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.batcher.close()

    app = FastAPI(title="lora-tune", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    if is_loopback(host):
        app.add_middleware(HostCheck)
    answer_errors_as_openai_does(app)
    keyed = [Depends(server.authorize)]
    routes = [  # (method, path, endpoint, whether the key is required)
        ("GET", "/health", server.health, False),
        ("GET", "/v1/models", server.models, True),
        ("POST", "/v1/completions", server.completions, True),
        ("POST", "/v1/chat/completions", server.chat_completions, True),
        ("POST", "/v1/adapters", server.add_adapter, True),
        ("DELETE", "/v1/adapters/{name}", server.remove_adapter, True),
    ]
    for method, path, endpoint, key in routes:
        app.add_api_route(path, endpoint, methods=[method], dependencies=keyed if key else [])
    app.state.authorize = server.authorize  # routes added on top (`lora-tune ui`) take the same key
    return app


def answer_errors_as_openai_does(app: FastAPI) -> None:
    """Every error, ours, FastAPI's validation and Starlette's unknown paths, in OpenAI's error shape."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        what = "no such path" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {what}").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or None
        if first["type"] == "json_invalid":
            message = "the body is not valid JSON"
        elif where is None:  # a list, a string, or a body sent without Content-Type: application/json
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        else:
            message = f"{where}: {first['msg']}"
        return APIError(400, message, where).response()


async def answer(job: Job, body: Generation, chat: bool):
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        return StreamingResponse(_events(job, meta, chat), media_type="text/event-stream")
    parts = []
    while not isinstance(event := await job.events.get(), Done):
        if isinstance(event, Failed):
            raise _failure(event.error)
        parts.append(event.text)
    text = "".join(parts)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": event.reason} if chat
              else {"index": 0, "text": text, "logprobs": None, "finish_reason": event.reason})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": event.usage}


async def _events(job: Job, meta: dict, chat: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None = None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield chunk("", first=True)
        while isinstance(event := await job.events.get(), Text):
            yield chunk(event.text)
        if isinstance(event, Failed):
            failure = _failure(event.error)
            yield f"data: {json.dumps({'error': {'message': failure.message, 'type': failure.kind}})}\n\n"
        else:
            yield chunk(None, event.reason)
        yield "data: [DONE]\n\n"
    finally:
        if job.finish_reason is None:
            job.finish_reason = "cancelled"  # the client went away: the batcher drops the row at its next token


def _failure(exc: Exception) -> APIError:
    if isinstance(exc, UserError):  # e.g. the adapter was removed while the request waited
        return APIError(404, str(exc), "model", "model_not_found")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")
