"""`rewrite serve`: the engine's continuous batching across adapters against each request generated alone, and
the HTTP server through the official `openai` client (completions, streaming, adapters, load, bad requests,
disconnects, SIGTERM, metrics)."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rewrite
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.generate import CachedModel, stream
from rewrite.runtime.predict import predict
from rewrite.serve.app import Config, create_app
from rewrite.serve.engine import Batch, Engine, Request

from helpers import lora_graph, randomize_trainable
from no_torch import NO_TORCH
from test_adapter_cache import lora
from test_kv_cache import byte_tokenizer, tiny_lm

RANKS = [4, 2, 4, 8]  # different ranks, so the stack pads them
PROMPTS = ["the cat sat", "a longer prompt, left padded", "once upon a time", "x", "hello there, general",
           "to be or not", "rain", "what is the capital of"]
STEPS = 12
BASE = "tiny"


class Built:
    """A tiny LLaMA exported --with-cache --mixed-adapters, four adapter files, and each (prompt, adapter)'s text
    generated alone."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.model = directory / "mixed" / "model.onnx"
        self.files: dict[str, Path] = {}
        self._solo: dict[tuple, CachedModel] = {}
        self._texts: dict[tuple, str] = {}

    def solo_model(self, adapter: str | None) -> CachedModel:
        if adapter not in self._solo:
            adapters = Adapters(stacked=[str(self.files[adapter])], index=[0]) if adapter else None
            self._solo[adapter] = CachedModel(self.model, adapters=adapters)
        return self._solo[adapter]

    def alone(self, prompt: str, adapter: str | None, steps: int = STEPS) -> str:
        """What `rewrite.generate` gives this prompt with this adapter alone (greedy)."""
        key = (prompt, adapter, steps)
        if key not in self._texts:
            model = self.solo_model(adapter)
            tokens = [int(t[0]) for t, _ in stream(model, [prompt], max_new_tokens=steps)]
            self._texts[key] = model.tokenizer.decode(tokens, skip_special_tokens=True)
        return self._texts[key]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    directory = tmp_path_factory.mktemp("serve")
    tiny_lm("llama").save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    built = Built(directory)
    rewrite.export_onnx(lora(directory, 4, 8), built.model, cache=True, mixed_adapters=True)
    for number, rank in enumerate(RANKS):
        gm = lora(directory, rank, 2 * rank)
        randomize_trainable(gm, seed=30 + number, scale=0.1)
        rewrite.save_adapter(gm, directory / f"adapter{number}")
        built.files[f"a{number}"] = export_adapter(directory / f"adapter{number}",
                                                   directory / f"a{number}.onnx_adapter", built.model)
    return built


def other_base(source: Path, output: Path) -> Path:
    """`source`'s tensors in a file that says it was made for another base model."""
    adapter = ort.AdapterFormat.read_adapter(str(source))
    other = ort.AdapterFormat()
    other.set_adapter_version(1)
    other.set_model_version(adapter.get_model_version() + 1)
    other.set_parameters(adapter.get_parameters())
    other.export_adapter(str(output))
    return output


# -- the engine, without HTTP


def run_engine(built: Built, submit) -> Engine:
    engine = Engine(CachedModel(built.model), max_batch=8)
    for name, path in built.files.items():
        engine.load(name, path)
    engine.thread.start()
    submit(engine)
    engine.stop()
    return engine


def collector(texts: dict, key, then=None):
    """An emit callback gathering a request's text (calling `then(tokens)` on every event)."""
    texts[key] = ""

    def emit(event):
        texts[key] += event.text
        if then:
            then(event.tokens)
    return emit


def test_rows_joining_and_leaving_mid_decode_generate_as_each_alone(built):
    texts: dict = {}
    order = [(p, [None, "a0", "a1", "a2", "a3"][i % 5]) for i, p in enumerate(PROMPTS)]

    def submit(engine):
        def join_later(index):  # each request lets the next in after 3 tokens: the batch changes every few steps
            def then(tokens):
                if tokens >= 3 and index + 1 < len(order) and index + 1 not in texts:
                    push(index + 1)
            return then

        def push(index):
            prompt, adapter = order[index]
            engine.submit(Request(built.solo_model(adapter).encode([prompt])[0][0], STEPS + index % 3,
                                  collector(texts, index, join_later(index)), adapter=adapter))
        push(0)
        while len(texts) < len(order) or engine.running or engine.waiting:
            time.sleep(0.01)

    run_engine(built, submit)
    for index, (prompt, adapter) in enumerate(order):
        assert texts[index] == built.alone(prompt, adapter, STEPS + index % 3), (prompt, adapter)
    assert len({texts[i] for i in range(len(order))}) == len(order)  # the adapters change the text


def test_a_cancelled_row_leaves_and_the_others_generate_as_alone(built):
    texts: dict = {}
    requests = []

    def submit(engine):
        cancel = lambda tokens: tokens >= 2 and engine.cancel(requests[0])  # noqa: E731
        for number, (prompt, adapter) in enumerate([(PROMPTS[0], "a0"), (PROMPTS[1], "a1"), (PROMPTS[2], None)]):
            ids = built.solo_model(adapter).encode([prompt])[0][0]
            requests.append(Request(ids, STEPS, collector(texts, number, cancel if number == 0 else None),
                                    adapter=adapter))
        for request in requests:
            engine.submit(request)
        while not all(r.done for r in requests[1:]) or engine.running:
            time.sleep(0.01)

    run_engine(built, submit)
    assert len(requests[0].tokens) < STEPS and not requests[0].done
    assert texts[1] == built.alone(PROMPTS[1], "a1") and texts[2] == built.alone(PROMPTS[2], None)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_merged_batch_pads_the_shorter_past_on_the_models_side_and_trims_it_when_its_rows_leave(side):
    """Right for a lowered model (each row's cache from its start), left for an unlowered sliding-window one."""
    def batch(lengths, width):
        mask = np.zeros((len(lengths), width), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, slice(0, length) if side == "right" else slice(width - length, width)] = 1
        past = [mask[:, None, :, None].astype(np.float32) * (1 + np.arange(len(lengths)))[:, None, None, None]]
        return Batch([object()] * len(lengths), np.zeros(len(lengths), dtype=np.int64), mask, mask.sum(-1), past, side)

    merged = batch([3], 3).merge(batch([5, 2], 5))
    assert merged.mask.tolist() == ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]] if side == "right" else
                                    [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert (merged.past[0][:, 0, :, 0] == merged.mask * [[1], [1], [2]]).all()
    kept = merged.keep(np.array([True, False, True]))
    assert kept.mask.tolist() == ([[1, 1, 1], [1, 1, 0]] if side == "right" else [[1, 1, 1], [0, 1, 1]])
    assert kept.past[0].shape[2] == 3 and kept.next_position.tolist() == [3, 2]


def test_masked_padding_weighs_exactly_nothing(built):
    """Whatever the padding after a row's past holds (a merged batch pads the shorter past on the right), its logits
    are the same bit for bit (the mask's weights there are exactly zero, or a lowered attention reads only the row's
    length), and they equal the unpadded row's up to the order of the sums."""
    from rewrite.runtime.cache import empty_past, positions
    model = built.solo_model(None)
    ids, mask = model.encode([PROMPTS[0]])
    logits, past = model.step(ids, mask, positions(mask), empty_past(model.layout, 1), model.adapter_feeds(1))
    token, position = logits.argmax(-1)[:, None], np.array([[ids.shape[1]]])
    step = lambda m, p: model.step(token, m, position, p, model.adapter_feeds(1))[0]  # noqa: E731
    ones = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
    padded_mask = np.concatenate([ones[:, :-1], np.zeros((1, 5), dtype=np.int64), ones[:, -1:]], 1)
    noise = np.random.default_rng(0)
    padded = [[np.concatenate([p, fill(p)], 2) for p in past]
              for fill in (lambda p: np.zeros_like(p[:, :, :5]), lambda p: noise.normal(0, 100, p[:, :, :5].shape)
                           .astype(p.dtype))]
    np.testing.assert_array_equal(step(padded_mask, padded[0]), step(padded_mask, padded[1]))
    assert np.abs(step(padded_mask, padded[0]) - step(ones, past)).max() <= 1e-5


# -- the HTTP server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rewrite serve` in a subprocess on a free port, where importing torch or transformers fails."""

    def __init__(self, built: Built, *args: str):
        self.built, self.port = built, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        adapters = [a for name, path in built.files.items() for a in ("--adapter", f"{name}={path}")]
        self.process = subprocess.Popen(
            [sys.executable, "-c", NO_TORCH + "from rewrite.cli.main import main; main()", "serve", str(built.model),
             "--port", str(self.port), "--served-model-name", BASE, *adapters, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"rewrite serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **options)

    def post(self, path: str, **options) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **options)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else ""): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(built):
    running = Server(built, "--max-batch", "16")
    yield running
    assert running.stop() == 0


def test_completions_with_the_base_and_an_adapter_as_each_alone(built, server):
    client = server.client()
    for model, adapter in ((BASE, None), ("a2", "a2")):
        answer = client.completions.create(model=model, prompt=PROMPTS[:2], max_tokens=STEPS, temperature=0)
        assert [c.text for c in answer.choices] == [built.alone(p, adapter) for p in PROMPTS[:2]]
        assert [c.index for c in answer.choices] == [0, 1] and answer.model == model
        assert answer.choices[0].finish_reason == "length"
        prompt_tokens = sum(len(built.solo_model(None).encode([p])[0][0]) for p in PROMPTS[:2])
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 2 * STEPS)


def test_streaming_gives_the_text_in_pieces_ending_with_done(built, server):
    chunks = list(server.client().completions.create(model="a1", prompt=PROMPTS[2], max_tokens=STEPS, temperature=0,
                                                     stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == built.alone(PROMPTS[2], "a1")
    assert chunks[-1].choices[0].finish_reason == "length"
    raw = server.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")


def test_a_stop_string_ends_the_text_before_it(built, server):
    full = built.alone(PROMPTS[0], "a3")
    stop = next(c for c in full[2:] if c.isascii())  # whole characters, not a byte the next one completes
    answer = server.client().completions.create(model="a3", prompt=PROMPTS[0], max_tokens=STEPS, temperature=0,
                                                stop=[stop, "never seen"])
    assert answer.choices[0].text == full[:full.index(stop)] and answer.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    ask = lambda seed: server.client().completions.create(  # noqa: E731
        model="a0", prompt=PROMPTS[1], max_tokens=STEPS, temperature=0.9, top_p=0.9, seed=seed).choices[0].text
    assert ask(3) == ask(3)


def test_64_concurrent_requests_over_4_adapters_and_the_base_each_answer_as_alone(built, server):
    models = [BASE, *built.files]
    jobs = [(PROMPTS[i % len(PROMPTS)], models[i % len(models)], bool(i % 2)) for i in range(64)]

    async def ask(client, prompt, model, streaming):
        answer = await client.completions.create(model=model, prompt=prompt, max_tokens=STEPS, temperature=0,
                                                 stream=streaming)
        if streaming:
            return "".join([c.choices[0].text async for c in answer])
        return answer.choices[0].text

    async def everything():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64), timeout=120)) as client:
            return await asyncio.gather(*(ask(client, *job) for job in jobs))

    texts = asyncio.run(everything())
    for (prompt, model, _), text in zip(jobs, texts):
        assert text == built.alone(prompt, None if model == BASE else model), (prompt, model)
    metrics = server.metrics()
    assert metrics["rewrite_batch_size_count"] > 0 and metrics["rewrite_batch_size_sum"] > metrics[
        "rewrite_batch_size_count"]  # steps ran several rows at once
    assert metrics.get('rewrite_requests_total{"outcome": "error"}', 0) == 0


BAD = [
    ("bad JSON", {"content": b"{nope"}, 400, "not valid JSON"),
    ("not an object", {"json": [1]}, 400, "not an object"),
    ("unknown model", {"json": {"model": "nobody", "prompt": "x"}}, 404, "does not exist"),
    ("prompt of the wrong type", {"json": {"model": BASE, "prompt": 3}}, 400, "prompt must be a string"),
    ("max_tokens a string", {"json": {"model": BASE, "prompt": "x", "max_tokens": "9"}}, 400, "max_tokens '9'"),
    ("max_tokens 0", {"json": {"model": BASE, "prompt": "x", "max_tokens": 0}}, 400, "at least 1"),
    ("max_tokens past the limit", {"json": {"model": BASE, "prompt": "x", "max_tokens": 5000}}, 400,
     "more than the model's"),
    ("prompt past the limit", {"json": {"model": BASE, "prompt": "y" * 3000, "max_tokens": 1}}, 400,
     "more than the model's"),
    ("temperature negative", {"json": {"model": BASE, "prompt": "x", "temperature": -1}}, 400, "temperature -1"),
    ("n 2", {"json": {"model": BASE, "prompt": "x", "n": 2}}, 400, "n 2 is not supported"),
    ("unsupported field", {"json": {"model": BASE, "prompt": "x", "tools": []}}, 400, "'tools' is not supported"),
    ("stop of the wrong type", {"json": {"model": BASE, "prompt": "x", "stop": 4}}, 400, "stop must be a string"),
    ("oversized body", {"json": {"model": BASE, "prompt": "z" * 2_000_000}}, 413, "byte limit"),
]


@pytest.mark.parametrize("what, request_options, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_one_sentence_4xx_in_openais_shape_and_the_server_keeps_serving(
        built, server, what, request_options, status, message):
    answer = server.post("/v1/completions", **request_options)
    error = answer.json()["error"]
    assert answer.status_code == status and message in error["message"], error
    assert error["type"] == "invalid_request_error" and error["message"].count(". ") == 0
    assert server.client().completions.create(model=BASE, prompt="x", max_tokens=2, temperature=0).choices


def wait_until(condition, what: str) -> None:
    """Polls `condition` (a liveness bound, not a timing: a broken server fails here instead of hanging)."""
    for _ in range(1200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never got to: {what}")


CANCELLED = 'rewrite_requests_total{"outcome": "cancelled"}'
LONG = 1900  # tokens (ignoring the end of sequence): far more than anything else in these tests asks for


def assert_cancelled(server: Server, leave, before: dict) -> None:
    """`leave()` starts a long request and goes away: it is counted cancelled, its row leaves long before its
    tokens are done, and the server still answers."""
    leave()
    wait_until(lambda: server.metrics().get(CANCELLED, 0) == before.get(CANCELLED, 0) + 1, "count the cancellation")
    wait_until(lambda: server.metrics()["rewrite_running_requests"] == 0, "retire the row")
    generated = server.metrics()["rewrite_generation_tokens_total"] - before["rewrite_generation_tokens_total"]
    assert generated < LONG
    assert server.metrics()["rewrite_running_requests"] == 0
    assert server.client().completions.create(model="a1", prompt=PROMPTS[0], max_tokens=STEPS,
                                              temperature=0).choices[0].text == server.built.alone(PROMPTS[0], "a1")


def test_a_client_leaving_mid_stream_cancels_its_row(server):
    def leave():
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"model": "a1", "prompt": "so long", "max_tokens": LONG, "stream": True,
                                "ignore_eos": True}) as answer:
            next(answer.iter_lines())
    assert_cancelled(server, leave, server.metrics())


def test_a_client_leaving_before_its_whole_answer_cancels_its_row(server):
    def leave():
        body = json.dumps({"model": "a2", "prompt": "so long", "max_tokens": LONG, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: server.metrics()["rewrite_running_requests"] == 1, "admit the request")
    assert_cancelled(server, leave, server.metrics())


def test_adapters_load_and_unload_at_run_time_and_one_for_another_base_is_refused(built, server, tmp_path):
    client = server.client()
    loaded = server.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(built.files["a3"])})
    assert loaded.status_code == 200
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {BASE, "a0", "a1", "a2", "a3", "late"} and listed["late"].parent == BASE
    answer = client.completions.create(model="late", prompt=PROMPTS[3], max_tokens=STEPS, temperature=0)
    assert answer.choices[0].text == built.alone(PROMPTS[3], "a3")
    assert server.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="late", prompt="x", max_tokens=2)
    foreign = server.post("/v1/load_lora_adapter", json={"lora_name": "foreign", "lora_path": str(
        other_base(built.files["a0"], tmp_path / "foreign.onnx_adapter"))})
    assert foreign.status_code == 400 and "made for another base model" in foreign.json()["error"]["message"]
    assert "foreign" not in {m.id for m in client.models.list().data}
    assert server.post("/v1/unload_lora_adapter", json={"lora_name": "nobody"}).status_code == 404


def test_metrics_parse_as_prometheus_text(server):
    server.client().completions.create(model=BASE, prompt="x", max_tokens=3, temperature=0)
    metrics = server.metrics()
    for name in ("rewrite_prompt_tokens_total", "rewrite_generation_tokens_total", "rewrite_queue_depth",
                 "rewrite_request_latency_seconds_count", "rewrite_time_to_first_token_seconds_count"):
        assert name in metrics
    assert metrics['rewrite_requests_total{"outcome": "ok"}'] >= 1


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(built):
    running = Server(built)
    steps = 400
    texts, first = {}, threading.Barrier(4)

    def ask(number):
        prompt, model = PROMPTS[number], ["a0", "a1", BASE, "a2"][number]
        parts = []
        for chunk in running.client().completions.create(model=model, prompt=prompt, max_tokens=steps,
                                                         temperature=0, stream=True):
            if not parts:
                first.wait()
            parts.append(chunk.choices[0].text)
        texts[number] = "".join(parts)

    askers = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    for asker in askers:
        asker.start()
    first.wait()  # every request has its first text: they are in flight
    assert running.stop() == 0
    for asker in askers:
        asker.join()
    for number, model in enumerate(["a0", "a1", None]):
        assert texts[number] == built.alone(PROMPTS[number], model, steps)


# -- in process: queue limits and the classify endpoint


def asgi(app) -> httpx.AsyncClient:
    """A client of the app itself, no socket between (and no lifespan: the engine runs only if a test starts it)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve", timeout=60)


def in_process(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://serve/v1", api_key="none", max_retries=0, http_client=asgi(app))


def test_a_full_queue_answers_429_and_a_draining_server_503(built):
    app = create_app(Config(built.model, served_name=BASE, max_batch=1, max_queue=1))
    engine = app.state.service.engine  # not started: the first request waits in the queue

    async def scenario():
        async with in_process(app) as client:
            ask = lambda: client.completions.create(model=BASE, prompt="x", max_tokens=2)  # noqa: E731
            waiting = asyncio.ensure_future(ask())
            while not engine.waiting:
                await asyncio.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="queue holds its limit of 1 waiting requests"):
                await ask()
            engine.drain()
            with pytest.raises(openai.InternalServerError, match="shutting down") as refused:
                await ask()
            assert refused.value.status_code == 503
            waiting.cancel()

    asyncio.run(scenario())
    assert engine.waiting[0].cancelled


@pytest.fixture(scope="module")
def classifier(tiny_bert_dir, tmp_path_factory):
    """A tiny BERT classifier exported with adapter slots, and one adapter file for it."""
    directory = tmp_path_factory.mktemp("classifier")
    gm = lora_graph(tiny_bert_dir)
    model = directory / "model.onnx"
    rewrite.export_onnx(gm, model, adapter_slots=True)
    randomize_trainable(gm, seed=3)
    rewrite.save_adapter(gm, directory / "adapter")
    return model, export_adapter(directory / "adapter", directory / "a.onnx_adapter", model)


def test_classify_gives_predicts_labels_and_scores_for_the_base_and_an_adapter(classifier):
    model, adapter = classifier
    app = create_app(Config(model, {"sentiment": str(adapter)}, served_name=BASE))
    texts = ["a fine day", "awful"]

    async def classify(name: str) -> list:
        async with asgi(app) as client:
            answer = await client.post("/v1/classify", json={"model": name, "input": texts, "top_k": 2})
        return [[(s["label"], s["score"]) for s in row["labels"]] for row in answer.json()["data"]]

    for name, adapters in ((BASE, None), ("sentiment", Adapters(active=str(adapter)))):
        got, expected = asyncio.run(classify(name)), predict(model, texts, top_k=2, adapters=adapters)
        assert [[label for label, _ in row] for row in got] == [[label for label, _ in row] for row in expected]
        assert np.allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in expected], atol=1e-6)
    assert asyncio.run(classify(BASE)) != asyncio.run(classify("sentiment"))
