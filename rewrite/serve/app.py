"""The HTTP side of `rewrite serve`: OpenAI's completions API (with vLLM's LoRA conventions) over the engine, a
classify endpoint for classifiers and fill-mask models, health and Prometheus metrics.

Engine events cross from the engine's thread to the event loop with `loop.call_soon_threadsafe`. A client that
goes away cancels its requests: while streaming, Starlette cancels the response's generator when the server
reports the disconnect; otherwise the handler waits on the result and on the disconnect, whichever comes first.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewrite.errors import RewriteError
from rewrite.runtime.adapters import Adapters, read_adapter
from rewrite.runtime.generate import CachedModel, Sampling
from rewrite.runtime.predict import Predictor
from rewrite.runtime.schema import ModelSchema
from rewrite.serve.engine import Engine, Event, Refused, Request
from rewrite.serve.metrics import Metrics

DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOPS = 4  # OpenAI's
# fields OpenAI defines that this server takes only at their default value
DEFAULT_ONLY = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0,
                "frequency_penalty": 0, "logit_bias": None, "suffix": None}
PROMPT = "prompt"  # the request field holding the texts to continue (OpenAI's name)
KNOWN = {"model", PROMPT, "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
         "user", "ignore_eos", *DEFAULT_ONLY}  # ignore_eos: vLLM's extension (a fixed number of tokens)


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class Config:
    model: Path
    adapters: dict[str, str] = field(default_factory=dict)
    served_name: str | None = None
    tokenizer: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    threads: int | None = None
    max_body: int = 1 << 20

    @property
    def name(self) -> str:
        return self.served_name or self.model.parent.name or self.model.stem


class Service:
    """What the routes share: the model (a cached LM with its engine, or a `Predictor`) and the adapters."""

    def __init__(self, config: Config):
        self.config, self.metrics = config, Metrics()
        self.created = int(time.time())
        self.schema = ModelSchema.read(config.model)
        self.engine: Engine | None = None
        self.predictor: Predictor | None = None
        self.adapters: dict[str, str] = {}
        if self.schema.cache is None:
            self.predictor = Predictor(config.model, config.tokenizer, config.threads)
        else:
            model = CachedModel(config.model, config.tokenizer, config.threads)
            model.tokenizer  # noqa: B018 (loaded once here, not raced for by the engine and the first request)
            self.engine = Engine(model, config.max_batch, config.max_queue, self.metrics)
        for name, path in config.adapters.items():
            self.load(name, path)

    def load(self, name: str, path: str) -> None:
        if name == self.config.name or name in self.adapters:
            raise RewriteError(f"adapter name {name!r} is already served; unload it first or pick another name")
        if self.engine:
            self.engine.load(name, path)
        else:
            read_adapter(path, self.schema.require_slots())
        self.adapters[name] = str(path)

    def predict_adapters(self, name: str | None, rows: int) -> Adapters | None:
        if name is None:
            return None
        if self.schema.require_slots().mixed:
            return Adapters(stacked=[self.adapters[name]], index=[0] * rows)
        return Adapters(active=self.adapters[name])

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise ApiError(404, f"adapter {name!r} is not loaded; GET /v1/models lists what is", "lora_name",
                           "model_not_found")
        del self.adapters[name]
        if self.engine:
            self.engine.unload(name)

    def adapter(self, body: dict) -> str | None:
        """The adapter `model` names (None: the base), or 404 as OpenAI answers an unknown model."""
        name = body.get("model", self.config.name)
        if not isinstance(name, str):
            raise ApiError(400, f"model {name!r} is not a string; pass the base's or an adapter's name", "model")
        if name == self.config.name:
            return None
        if name not in self.adapters:
            served = ", ".join([self.config.name, *self.adapters])
            raise ApiError(404, f"model {name!r} does not exist; this server serves {served}", "model",
                           "model_not_found")
        return name


# -- request bodies


async def read_json(request: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, refused past `limit` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body of {declared} bytes is over the server's {limit}-byte limit",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the server's {limit}-byte limit", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}, not an object; send a JSON object")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    below = value <= low if low_open else value < low
    if isinstance(value, bool) or not isinstance(value, (int, float)) or below or value > high:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"{name} {value!r} is not allowed; use a number in {span}", name)
    return float(value)


def _whole(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(400, f"{name} {value!r} is not allowed; use a whole number of at least {low}", name)
    return value


def _strings(body: dict, name: str, required: bool, most: int | None = None) -> list[str]:
    value = body.get(name)
    if value is None and not required:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ApiError(400, f"{name} must be a string or a non-empty list of strings, not {json.dumps(value)[:60]}",
                       name)
    if most is not None and len(values) > most:
        raise ApiError(400, f"{name} gives {len(values)} strings; give at most {most}", name)
    return values


def _refuse_unsupported(body: dict) -> None:
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"field {unknown[0]!r} is not supported by this server; it takes "
                       f"{', '.join(sorted(KNOWN - set(DEFAULT_ONLY)))}", unknown[0])
    for name, default in DEFAULT_ONLY.items():
        if body.get(name, default) not in (default, None):
            raise ApiError(400, f"{name} {body[name]!r} is not supported by this server; leave it out "
                           f"(or {json.dumps(default)})", name)
    for name in ("stream", "ignore_eos"):
        if not isinstance(body.get(name, False), bool):
            raise ApiError(400, f"{name} {body[name]!r} is not allowed; use true or false", name)


def _sampling(body: dict) -> Sampling:
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed {seed!r} is not allowed; use a whole number", "seed")
    return Sampling(do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p, seed=seed)


def _prompt_ids(model: CachedModel, prompts: list[str], max_tokens: int) -> list:
    """Each prompt's token ids (through the model's template), checked against the position limit."""
    rows = []
    for number, prompt in enumerate(prompts):
        try:
            ids, mask = model.encode([prompt])
        except RewriteError as error:
            raise ApiError(400, str(error), PROMPT) from None
        row = ids[0][mask[0] == 1]
        if not len(row):
            raise ApiError(400, f"prompt {number + 1} encodes to no tokens; give text in the tokenizer's vocabulary",
                           PROMPT)
        try:
            model.check_length(len(row), 1)
        except RewriteError as error:
            raise ApiError(400, str(error), PROMPT, "context_length_exceeded") from None
        try:
            model.check_length(len(row), max_tokens)
        except RewriteError as error:
            raise ApiError(400, str(error), "max_tokens", "context_length_exceeded") from None
        rows.append(row)
    return rows


# -- one completion call: its requests, their events, its metrics


@dataclass
class Call:
    service: Service
    model: str
    requests: list[Request] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.monotonic)
    first: bool = False
    outcome: str | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")

    def post(self, index: int, loop: asyncio.AbstractEventLoop, event: Event) -> None:
        loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

    async def events_until_done(self) -> AsyncIterator[tuple[int, Event]]:
        left = len(self.requests)
        while left:
            index, event = await self.events.get()
            if event.text and not self.first:
                self.first = True
                self.service.metrics.first_token.observe(time.monotonic() - self.started)
            left -= event.finish is not None
            yield index, event

    def end(self, outcome: str) -> None:
        """Records the call once; a call that did not end cancels its requests' rows."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        for request in self.requests:
            if not request.done:
                self.service.engine.cancel(request)
        metrics = self.service.metrics
        metrics.requests.labels(outcome).inc()
        if outcome == "ok":
            metrics.latency.observe(time.monotonic() - self.started)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": choices}
        return body | ({"usage": usage} if usage is not None else {})

    def usage(self) -> dict:
        prompt = sum(len(r.ids) for r in self.requests)
        completion = sum(len(r.tokens) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(index: int, text: str, finish: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _failed(event: Event) -> ApiError:
    return ApiError(500, event.error or "the request failed", kind="server_error")


async def _disconnected(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def completions(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    if service.engine is None:
        raise ApiError(400, f"model {service.config.name!r} was not exported with a KV cache, so it does not generate; "
                       "POST /v1/classify for its labels and scores")
    body = await read_json(request, service.config.max_body)
    _refuse_unsupported(body)
    adapter = service.adapter(body)
    prompts = _strings(body, PROMPT, required=True)
    max_tokens = _whole(body, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    sampling = _sampling(body)
    stops = tuple(_strings(body, "stop", required=False, most=MAX_STOPS))
    ids = _prompt_ids(service.engine.model, prompts, max_tokens)
    call = Call(service, body.get("model", service.config.name))
    loop = asyncio.get_running_loop()
    for index, row in enumerate(ids):
        emit = lambda event, index=index: call.post(index, loop, event)  # noqa: E731
        call.requests.append(Request(row, max_tokens, emit, sampling, adapter, stops, body.get("ignore_eos", False)))
    try:
        for engine_request in call.requests:
            service.engine.submit(engine_request)
    except Refused as refusal:
        for engine_request in call.requests:
            service.engine.cancel(engine_request)
        kind, code = ("rate_limit_error", "rate_limit_exceeded") if refusal.status == 429 else \
            ("server_error", "service_unavailable")
        raise ApiError(refusal.status, str(refusal), kind=kind, code=code) from None
    service.metrics.prompt.inc(sum(len(r) for r in ids))
    if body.get("stream", False):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(call, usage), media_type="text/event-stream")
    return await _whole_answer(call, request)


async def _stream(call: Call, usage: bool) -> AsyncIterator[str]:
    """Server-sent events, one per piece of text (then the usage when asked), ending with `data: [DONE]`;
    cancelled with the client."""
    try:
        async for index, event in call.events_until_done():
            if event.finish == "error":
                yield f"data: {json.dumps({'error': json.loads(_failed(event).response().body)['error']})}\n\n"
                call.end("error")
                return
            yield f"data: {json.dumps(call.chunk([_choice(index, event.text, event.finish)]))}\n\n"
        if usage:
            yield f"data: {json.dumps(call.chunk([], call.usage()))}\n\n"
        yield "data: [DONE]\n\n"
        call.end("ok")
    finally:
        call.end("cancelled")


async def _whole_answer(call: Call, request: HttpRequest) -> Response:
    async def collect() -> Response:
        texts, finishes = [""] * len(call.requests), [None] * len(call.requests)
        async for index, event in call.events_until_done():
            if event.finish == "error":
                call.end("error")
                return _failed(event).response()
            texts[index] += event.text
            finishes[index] = event.finish
        call.end("ok")
        return JSONResponse(call.chunk([_choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finishes))],
                                       call.usage()))

    answer, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            task.cancel()
        call.end("cancelled")
    if not answer.cancelled() and answer.done():
        return answer.result()
    return Response(status_code=499)  # nobody is listening


# -- the other routes


async def classify(request: HttpRequest) -> Response:
    """Labels and scores of a classifier or fill-mask model (vLLM's classify API), through the `Predictor`."""
    service: Service = request.app.state.service
    if service.engine is not None:
        raise ApiError(400, f"model {service.config.name!r} generates text; POST /v1/completions instead")
    body = await read_json(request, service.config.max_body)
    unknown = sorted(set(body) - {"model", "input", "top_k", "user"})
    if unknown:
        raise ApiError(400, f"field {unknown[0]!r} is not supported by /v1/classify; it takes model, input and top_k",
                       unknown[0])
    adapter = service.adapter(body)
    texts = _strings(body, "input", required=True)
    top_k = _whole(body, "top_k", 5, 1)
    try:
        adapters = service.predict_adapters(adapter, len(texts))
        results = await run_in_threadpool(service.predictor.predict, texts, top_k=top_k, adapters=adapters)
    except RewriteError as error:
        raise ApiError(400, str(error), "input") from None
    data = [{"index": i, "label": labels[0][0], "labels": [{"label": label, "score": score} for label, score in labels]}
            for i, labels in enumerate(results)]
    return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": body.get("model", service.config.name), "data": data})


async def models(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    card = lambda name, root, parent: {"id": name, "object": "model", "created": service.created,  # noqa: E731
                                       "owned_by": "rewrite", "root": root, "parent": parent}
    base = card(service.config.name, str(service.config.model), None)
    return JSONResponse({"object": "list", "data": [base, *(card(n, f, service.config.name)
                                                            for n, f in service.adapters.items())]})


async def load_adapter(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    body = await read_json(request, service.config.max_body)
    name, path = body.get("lora_name"), body.get("lora_path")
    for field_name, value in (("lora_name", name), ("lora_path", path)):
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"{field_name} {value!r} is not allowed; give a non-empty string", field_name)
    try:
        await run_in_threadpool(service.load, name, path)
    except RewriteError as error:
        raise ApiError(400, str(error), "lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_adapter(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    body = await read_json(request, service.config.max_body)
    name = body.get("lora_name")
    if not isinstance(name, str):
        raise ApiError(400, f"lora_name {name!r} is not allowed; give the adapter's name", "lora_name")
    service.unload(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


async def health(request: HttpRequest) -> Response:
    engine = request.app.state.service.engine
    if engine is not None and engine.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: HttpRequest) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _api_error(request: HttpRequest, error: ApiError) -> Response:
    request.app.state.service.metrics.requests.labels("rejected").inc()
    return error.response()


async def _http_error(request: HttpRequest, error: Any) -> Response:
    return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                    code=str(error.status_code)).response()


def create_app(config: Config) -> Starlette:
    """The app over `config`'s model; its engine's thread runs from startup to the end of shutdown."""
    service = Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if service.engine:
            service.engine.thread.start()
        yield
        if service.engine:
            await run_in_threadpool(service.engine.stop)

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={ApiError: _api_error, HTTPException: _http_error}, lifespan=lifespan)
    app.state.service = service
    return app
