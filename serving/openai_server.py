"""An OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn).

    POST /v1/completions, POST /v1/chat/completions   (stream true: SSE chunks, then [DONE])
    GET  /v1/models, /health, /metrics                 (Prometheus text)

The engine runs on its own thread; every request is one engine request, so concurrent clients
are batched together and each gets exactly the tokens it would get alone. Request fields
follow OpenAI's (prompt as text or token ids, max_tokens, temperature, top_p, seed, stop as
strings, n = 1) plus vLLM's extensions (top_k, repetition_penalty, stop_token_ids; token ids
in `stop` too). Errors are OpenAI's error JSON; a client that drops a stream cancels its
request and frees its slot.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mythos_deploy.errors import InputError
from mythos_deploy.runtimes.engine import Engine, QueueFullError, Request
from mythos_deploy.runtimes.sampling import SamplingParams
from mythos_deploy.serving.chat import check_messages, render
from mythos_deploy.serving.metrics import ServerMetrics

MAX_BODY = 1 << 20  # bytes


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", param=name)
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", param=name)
    return v


@dataclass
class Parsed:
    request: Request
    stream: bool
    include_usage: bool
    stop_strings: list[str]


class Server:
    """The app's state: one engine, its model name, an optional API key, the metrics."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None, max_body: int = MAX_BODY):
        self.engine, self.model_name, self.api_key, self.max_body = engine, model_name, api_key, max_body
        self.tokenizer = engine.backend.tokenizer
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    # ---- parsing ------------------------------------------------------------------------
    def parse(self, body, chat: bool) -> Parsed:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string (GET /v1/models lists it)", param="model")
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if _number(body, "n", 1, 1, 1 << 30, integer=True) != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        if body.get("logprobs") not in (None, False) or body.get("echo") or body.get("best_of") not in (None, 1):
            raise ApiError(400, "logprobs, echo and best_of are not supported")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        ids = self._chat_ids(body) if chat else self._prompt_ids(body.get("prompt"))
        room = self.engine.max_len - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's slots hold {self.engine.max_len} "
                                "positions, with room for at least one new token", param="prompt",
                           code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, room if chat else min(16, room), 1, 1 << 30, integer=True)
        if len(ids) + max_tokens > self.engine.max_len:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) + {key} ({max_tokens}) = {len(ids) + max_tokens} "
                                f"is longer than this server's context ({self.engine.max_len})", param=key,
                           code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = _number(body, "top_k", -1, -1, 1 << 30, integer=True)
        penalty = _number(body, "repetition_penalty", 1.0, 1e-3, 1e3)
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
            raise ApiError(400, f"seed must be an integer in [0, 2^63), got {json.dumps(seed)}", param="seed")
        stop_strings, stop_ids = self._stops(body)
        sampling = SamplingParams(greedy=temperature == 0, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                                  repetition_penalty=penalty, seed=seed)
        return Parsed(Request(ids, max_tokens, sampling, stop_ids, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"),
                      stream, bool(opts.get("include_usage")), stop_strings)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model carries no tokenizer: give the prompt as a list of token ids",
                               param="prompt")
            try:
                ids = self.tokenizer.encode(prompt)
            except InputError as exc:
                raise ApiError(400, str(exc), param="prompt") from None
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list):
            raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request: n = 1)",
                           param="prompt")
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        V = self.engine.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ApiError(400, f"token id {bad[0]} out of range [0, {V})", param="prompt")
        return ids

    def _chat_ids(self, body: dict) -> list[int]:
        tok = self.tokenizer
        if tok is None or tok.chat_template is None:
            raise ApiError(400, "this model has no chat template (tokenizer_config.json chat_template); "
                                "use /v1/completions", param="messages")
        try:
            text = render(tok.chat_template, check_messages(body.get("messages")), tok.special_tokens)
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return self._prompt_ids(text)

    def _stops(self, body: dict) -> tuple[list[str], list[int]]:
        stop = body.get("stop")
        items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else stop
        ids = body.get("stop_token_ids") or []
        if not isinstance(items, list) or not isinstance(ids, list):
            raise ApiError(400, "stop must be a string or a list of strings / token ids", param="stop")
        V = self.engine.cfg.vocab_size
        strings = [s for s in items if isinstance(s, str)]
        ints = [s for s in items if isinstance(s, int) and not isinstance(s, bool)] + ids
        if len(strings) + len(ints) != len(items) + len(ids) or any(s == "" for s in strings):
            raise ApiError(400, "stop must be non-empty strings or token ids", param="stop")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ints):
            raise ApiError(400, f"stop token ids must be in [0, {V})", param="stop")
        if len(strings) > 16:
            raise ApiError(400, "at most 16 stop strings", param="stop")
        return strings, ints

    # ---- generation ---------------------------------------------------------------------
    async def pieces(self, parsed: Parsed, state: dict):
        """Text pieces as tokens arrive (stop strings cut and held back as needed); fills
        `state` with finish_reason and completion_tokens. Cancels the request if the
        consumer stops early (a client disconnect)."""
        try:
            handle = self.engine.submit(parsed.request)
        except QueueFullError as exc:
            raise ApiError(503, str(exc), "server_error", code="overloaded") from None
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
        stream = self.tokenizer.stream(handle.prompt) if self.tokenizer else None
        stops, hold = parsed.stop_strings, max((len(s) for s in parsed.stop_strings), default=1) - 1
        text, sent, last = "", 0, None
        state.update(finish_reason=None, completion_tokens=0, prompt_tokens=len(handle.prompt))
        try:
            async for tok in handle.aiter():
                self.metrics.token(handle, tok, last)
                last = tok
                state["completion_tokens"] += 1
                text += stream.push(tok.id) if stream else f"{tok.id} "
                cut = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    state["finish_reason"] = "stop"
                    handle.cancel()
                    return
                safe = len(text) - hold if stops else len(text)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            if handle.finish_reason == "error":
                state["finish_reason"] = "error"
                raise ApiError(500, handle.error or "generation failed", "server_error")
            text += stream.flush() if stream else ""
            if len(text) > sent:
                yield text[sent:]
            state["finish_reason"] = "stop" if handle.finish_reason == "stop" else "length"
        finally:
            if not handle.done:  # the consumer went away: free the slot
                handle.cancel()
            self.metrics.finished(handle)

    def usage(self, state: dict) -> dict:
        return {"prompt_tokens": state["prompt_tokens"], "completion_tokens": state["completion_tokens"],
                "total_tokens": state["prompt_tokens"] + state["completion_tokens"]}


class _Guard:
    """The API key on /v1 and the body-size limit, as plain ASGI middleware: it answers or
    passes a request through, and never touches the response (Starlette's BaseHTTPMiddleware
    would relay every streamed chunk through a memory stream)."""

    def __init__(self, app, server: "Server"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = None
            if scope["path"].startswith("/v1/") and self.server.api_key is not None:
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.server.api_key}".encode()):
                    refusal = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key")
            length = headers.get("content-length")
            if refusal is None and length is not None and (not length.isdigit() or int(length) > self.server.max_body):
                refusal = error_response(413, f"the request body is larger than {self.server.max_body} bytes")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    server = Server(engine, model_name, api_key, max_body)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop(cancel=True)

    app = FastAPI(title="mythos-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    app.add_middleware(_Guard, server=server)

    async def read_body(request: HttpRequest):
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > server.max_body:
                raise ApiError(413, f"the request body is larger than {server.max_body} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def bad_method(request, exc):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "mythos-deploy", "max_model_len": engine.max_len,
                                            "backend": engine.backend.name}]}

    async def complete(request: HttpRequest, chat: bool):
        parsed = server.parse(await read_body(request), chat)
        rid, created = parsed.request.id, int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        state: dict = {}
        if not parsed.stream:
            text = "".join([p async for p in server.pieces(parsed, state)])
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                      if chat else {"index": 0, "text": text, "logprobs": None})
            choice["finish_reason"] = state["finish_reason"]
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                    "usage": server.usage(state)}
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        gen = server.pieces(parsed, state)
        try:  # the first piece (or an error) before the 200 goes out
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None

        def chunk(piece: str | None, finish=None) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": chunk_kind, "created": created, "model": model_name, "choices": [choice]}
            if parsed.include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                if chat:
                    role = {"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}
                    yield f"data: {json.dumps(role)}\n\n"
                if first is not None:
                    yield chunk(first)
                    async for piece in gen:
                        yield chunk(piece)
                yield chunk(None, state["finish_reason"])
                if parsed.include_usage:
                    yield f"data: {json.dumps({'id': rid, 'object': chunk_kind, 'created': created, 'model': model_name, 'choices': [], 'usage': server.usage(state)})}\n\n"
            except ApiError as exc:
                yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.type, 'param': None, 'code': exc.code}})}\n\n"
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await complete(request, chat=True)

    return app
