"""`rewrite serve` under load: tokens/s, latency and memory of one mixed-adapter model against the library
and against one folded model, on LLaMA-shaped causal LMs (random weights, MiniLM's tokenizer: `train_throughput.py`'s model
directories) exported with a KV cache.

    python benchmarks/serve_throughput.py [--models tiny,99m] [--concurrency 1,8,32] [--requests N]
                                          [--max-tokens 64] [--prompt-tokens 32] [--threads 2] [--json PATH]

Per model: 8 random LoRA adapters (r=8 on q, v) as `.onnx_adapter` files; the same requests (fixed
prompt length, greedy, `max_tokens`, the same prompts in every arm) are sent over 1 adapter (all to the
first) and over 8 (spread evenly), through
- the library, one request at a time: `rewrite.generate`'s loop (`CachedModel` + `stream`) on the export
  with adapter slots, the request's adapter active; the session is loaded once, before timing (the
  `rewrite.generate` function loads it on every call);
- `rewrite serve` on the `--with-cache --mixed-adapters` export with the 8 files, streaming (server-sent
  events), at each concurrency (a client semaphore over httpx);
- `rewrite serve` on a `--with-cache` export with the first adapter folded into the weights, no slots.
Every arm is warmed up before it is timed; ratios are computed within one run, and the arms a ratio compares
run back to back (at each concurrency the three server arms, the library right after the largest): on a
shared machine the load drifts, and ONNX Runtime's threads slow down sharply when other work takes a core.
The last column counts the answers equal to the library's for the same request. Also reported: p50/p99
request latency and time to first token, the server's steady and peak RSS, and cold start (process start
to the first answer, one token) against today's `rewrite run --generate` on the same model. The client
shares the machine's cores with the server, as a local client would.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput  # noqa: E402  (the LLaMA shapes and the model directories with a tokenizer)

MODELS = {"tiny": "tiny-llama", "99m": "llama-100m"}
REQUESTS = {"tiny": 128, "99m": 32}  # the tiny model answers 32 requests in about a second: too short to time
ADAPTERS = 8
LORA = dict(rank=8, alpha=16, roles=["q", "v"])


# ---------------------------------------------------------------- models


@dataclass
class Built:
    """A model's three cached exports and its adapter files (file i is adapter `a{i}`)."""

    mixed: Path
    slots: Path
    folded: Path
    files: list[Path] = field(default_factory=list)
    parameters: int = 0


def randomize_lora(gm, seed: int) -> None:
    """LoRA's B starts at zero; random A and B make each adapter change the text."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def build(name: str, workdir: Path) -> Built:
    """The mixed and slotted exports of the LoRA graph, ADAPTERS adapter files, and adapter 0 folded."""
    import rewrite
    from rewrite.export.onnx_adapters import export_adapter

    directory = train_throughput.model_dir(MODELS[name], workdir)
    base = rewrite.load_pretrained(directory)
    rewrite.apply(base, "lora", **LORA)
    built = Built(workdir / name / "mixed" / "model.onnx", workdir / name / "slots" / "model.onnx",
                  workdir / name / "folded" / "model.onnx", parameters=sum(p.numel() for p in base.parameters()))
    rewrite.export_onnx(base, built.mixed, cache=True, mixed_adapters=True)
    rewrite.export_onnx(base, built.slots, cache=True, adapter_slots=True)
    for number in range(ADAPTERS):
        trained = copy.deepcopy(base)
        randomize_lora(trained, seed=number)
        rewrite.save_adapter(trained, workdir / name / f"adapter{number}")
        built.files.append(export_adapter(workdir / name / f"adapter{number}", workdir / name / f"a{number}.onnx_adapter",
                                          built.mixed))
        if number == 0:
            rewrite.apply(trained, "fold")
            rewrite.export_onnx(trained, built.folded, cache=True)
    return built


# ---------------------------------------------------------------- requests and results


@dataclass
class Request:
    prompt: str
    adapter: int


@dataclass
class Answer:
    tokens: int
    latency: float
    first_token: float
    text: str


def prompts(model: Path, count: int, length: int) -> list[str]:
    """Texts of exactly `length` tokens (special tokens included) in the model's tokenizer, one per request."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.parent)
    texts = []
    for row in train_throughput.rows(count, length):
        words = row["text"].split()
        while len(tokenizer(" ".join(words))["input_ids"]) > length:
            words.pop()
        texts.append(" ".join(words))
    lengths = {len(tokenizer(text)["input_ids"]) for text in texts}
    if lengths != {length}:
        raise SystemExit(f"prompts of {sorted(lengths)} tokens, not {length}: the tokenizer splits these words")
    return texts


def spread(texts: list[str], adapters: int) -> list[Request]:
    return [Request(text, i % adapters) for i, text in enumerate(texts)]


def summary(answers: list[Answer], seconds: float) -> dict:
    latencies = [a.latency for a in answers]
    firsts = [a.first_token for a in answers]
    tokens = sum(a.tokens for a in answers)
    return {"requests": len(answers), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "latency_p50": float(np.percentile(latencies, 50)), "latency_p99": float(np.percentile(latencies, 99)),
            "ttft_p50": float(np.percentile(firsts, 50)), "ttft_p99": float(np.percentile(firsts, 99))}


# ---------------------------------------------------------------- the library, one request at a time


def library(built: Built, requests: list[Request], max_tokens: int, threads: int) -> tuple[dict, list[Answer]]:
    """`rewrite.generate`'s loop over one session, each request with its adapter file active."""
    from rewrite.runtime.adapters import Adapters
    from rewrite.runtime.generate import CachedModel, stream

    model = CachedModel(built.slots, threads=threads)

    def answer(request: Request, tokens: int) -> Answer:
        model.adapters = Adapters(active=str(built.files[request.adapter]))
        started = time.perf_counter()
        steps, first = [], None
        for ids, _ in stream(model, [request.prompt], max_new_tokens=tokens):
            first = time.perf_counter() - started if first is None else first
            steps.append(ids)
        text = model.tokenizer.decode(np.stack(steps, 1)[0], skip_special_tokens=True)
        return Answer(len(steps), time.perf_counter() - started, first, text)

    answer(requests[0], 4)
    started = time.perf_counter()
    answers = [answer(request, max_tokens) for request in requests]
    return summary(answers, time.perf_counter() - started), answers


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int, field_name: str) -> int:
    """A /proc/<pid>/status value in bytes (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def rewrite_command() -> list[str]:
    """The `rewrite` script's entry point in this interpreter (no shell shim in front to time)."""
    return [sys.executable, "-c", "from rewrite.cli.main import main; main()"]


class Server:
    """`rewrite serve` in its own process: started, timed to its first answer, measured, stopped by SIGTERM."""

    def __init__(self, model: Path, files: list[Path], threads: int, max_batch: int, max_queue: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        adapters = [arg for i, f in enumerate(files) for arg in ("--adapter", f"a{i}={f}")]
        self.command = [*rewrite_command(), "serve", str(model), *adapters, "--host", "127.0.0.1", "--port",
                        str(self.port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
                        "--threads", str(threads)]
        self.log = log

    def __enter__(self) -> "Server":
        self.output = self.log.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self.output, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
            self.names = [m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=60).json()["data"]]
            first = "a0" if "a0" in self.names else self.names[0]
            asyncio.run(drive(self.url, [Request("the", 0)], [first], 1, 1))
        except BaseException:
            self.__exit__()
            raise
        self.cold_start = time.perf_counter() - self.started
        return self

    def _wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"`{' '.join(self.command)}` exited with {self.process.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"`rewrite serve` did not answer /health within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def memory(self) -> dict:
        return {"rss_bytes": proc_status(self.process.pid, "VmRSS"), "peak_rss_bytes": proc_status(self.process.pid, "VmHWM")}

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()


async def complete(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Answer:
    """One streamed completion: tokens from the usage chunk (or one per chunk), latency, time to first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, chunks, usage, text = None, 0, None, []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"the server answered {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("choices"):
                first = time.perf_counter() - started if first is None else first
                chunks += 1
                text.append(event["choices"][0].get("text") or "")
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    return Answer(chunks if usage is None else usage, time.perf_counter() - started, first, "".join(text))


async def drive(url: str, requests: list[Request], names: list[str], concurrency: int,
                max_tokens: int) -> tuple[dict, list[Answer]]:
    """All requests, at most `concurrency` in flight; request i asks for model `names[request.adapter]`."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def one(request: Request) -> Answer:
            async with gate:
                return await complete(client, url, names[request.adapter], request.prompt, max_tokens)

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(request) for request in requests))
        return summary(answers, time.perf_counter() - started), answers


def serve_arm(server: Server, names: list[str], requests: list[Request], concurrency: int, max_tokens: int) -> dict:
    """The request set at one concurrency, after a warm-up at that concurrency."""
    asyncio.run(drive(server.url, requests[:concurrency], names, concurrency, 4))
    result, answers = asyncio.run(drive(server.url, requests, names, concurrency, max_tokens))
    return result | {"texts": [a.text for a in answers]}


# ---------------------------------------------------------------- today's CLI


def cli_cold_start(model: Path, adapter: Path, prompt: str) -> dict:
    """`rewrite run --generate` of one token: process start to exit (its output), and its peak RSS, read from
    /proc while it runs (`wait4`'s maximum would count the pages the child held between fork and exec, this
    benchmark's own, since Linux keeps the larger of the two across exec)."""
    command = [*rewrite_command(), "run", str(model), "--generate", "--text", prompt, "--max-new-tokens", "1",
               "--adapters", str(adapter)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, proc_status(process.pid, "VmHWM"))
        except (OSError, KeyError):  # exiting: its status is gone or no longer lists memory
            pass
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed:\n{process.stderr.read().decode()[-2000:]}")
    return {"cold_start_s": seconds, "peak_rss_bytes": peak}


# ---------------------------------------------------------------- one model, the report


def measure(name: str, workdir: Path, args, progress) -> dict:
    progress(f"{name}: exporting (mixed, slotted, folded) and {ADAPTERS} adapter files")
    built = build(name, workdir)
    count = args.requests or REQUESTS[name]
    texts = prompts(built.mixed, count, args.prompt_tokens)
    sets = {"1 adapter": spread(texts, 1), f"{ADAPTERS} adapters": spread(texts, ADAPTERS)}
    result = {"model": name, "parameters": built.parameters, "requests": count, "max_tokens": args.max_tokens,
              "prompt_tokens": args.prompt_tokens, "threads": args.threads, "arms": {}}
    largest, logs = max(args.concurrency), workdir / name
    progress(f"{name}: rewrite serve, the mixed model with {ADAPTERS} adapters and the folded model")
    with Server(built.mixed, built.files, args.threads, largest, 2 * count + largest, logs / "mixed.log") as mixed, \
            Server(built.folded, [], args.threads, largest, 2 * count + largest, logs / "folded.log") as folded:
        adapters = [f"a{i}" for i in range(ADAPTERS)]
        arms = {"mixed 1 adapter": (mixed, adapters, sets["1 adapter"]),
                f"mixed {ADAPTERS} adapters": (mixed, adapters, sets[f"{ADAPTERS} adapters"]),
                "folded": (folded, folded.names, sets["1 adapter"])}
        for concurrency in args.concurrency:  # the arms a ratio compares run back to back: the machine's load drifts
            for label, (server, names, requests) in arms.items():
                result["arms"][f"{label} c={concurrency}"] = serve_arm(server, names, requests, concurrency,
                                                                       args.max_tokens)
                progress(f"  {label} at concurrency {concurrency}: "
                         f"{result['arms'][f'{label} c={concurrency}']['tokens_per_s']:.1f} tok/s")
        for label, requests in sets.items():  # right after the largest concurrency, the goal's
            progress(f"{name}: library, {label}, one request at a time")
            result["arms"][f"library {label}"], answers = library(built, requests, args.max_tokens, args.threads)
            result["arms"][f"library {label}"]["texts"] = [a.text for a in answers]
            progress(f"  {result['arms'][f'library {label}']['tokens_per_s']:.1f} tok/s")
        result["serve_mixed"] = {"cold_start_s": mixed.cold_start, **mixed.memory()}
        result["serve_folded"] = {"cold_start_s": folded.cold_start, **folded.memory()}
    order = [f"library {label}" for label in sets] + [f"{label} c={c}" for label in arms for c in args.concurrency]
    result["arms"] = {arm: result["arms"][arm] for arm in order}
    progress(f"{name}: rewrite run --generate, cold")
    result["cli_run"] = cli_cold_start(built.mixed, built.files[0], texts[0])
    return result


def ratios(result: dict, concurrency: list[int]) -> dict:
    arms = result["arms"]
    out = {}
    for c in concurrency:
        for label in ("1 adapter", f"{ADAPTERS} adapters"):
            out[f"{label} c={c} / library"] = arms[f"mixed {label} c={c}"]["tokens_per_s"] / arms[f"library {label}"]["tokens_per_s"]
        out[f"{ADAPTERS} adapters c={c} / folded"] = (arms[f"mixed {ADAPTERS} adapters c={c}"]["tokens_per_s"]
                                                     / arms[f"folded c={c}"]["tokens_per_s"])
    return out


def agreement(result: dict) -> dict:
    """Per server arm, how many answers equal the library's for the same request (greedy; 1-adapter arms
    against the library's 1-adapter answers)."""
    arms = result["arms"]
    out = {}
    for name, arm in arms.items():
        if name.startswith("library"):
            continue
        reference = arms["library 1 adapter" if "1 adapter" in name or name.startswith("folded")
                         else f"library {ADAPTERS} adapters"]["texts"]
        out[name] = sum(a == b for a, b in zip(arm["texts"], reference))
    return out


def table(result: dict) -> str:
    arms, ratio = result["arms"], result["ratios"]
    lines = [f"**{result['model']}** ({result['parameters'] / 1e6:.1f}M parameters; {result['requests']} requests of "
             f"{result['prompt_tokens']} prompt tokens, max_tokens {result['max_tokens']}, greedy; ONNX Runtime "
             f"{result['threads']} threads)", "",
             "| arm | concurrency | tokens/s | vs library | vs folded | latency p50 / p99 s | TTFT p50 / p99 s | same text as library |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, arm in arms.items():
        concurrency = name.rpartition("c=")[2] if "c=" in name else "1 (sequential)"
        label = name.rsplit(" c=", 1)[0]
        versus = ratio.get(f"{label.removeprefix('mixed ')} c={concurrency} / library", "")
        folded = ratio.get(f"{label.removeprefix('mixed ')} c={concurrency} / folded", "")
        same = f"{result['agreement'][name]}/{arm['requests']}" if name in result["agreement"] else "-"
        lines.append(f"| {label} | {concurrency} | {arm['tokens_per_s']:.1f} | "
                     f"{f'{versus:.2f}x' if versus else ''} | {f'{folded:.2f}x' if folded else ''} | "
                     f"{arm['latency_p50']:.2f} / {arm['latency_p99']:.2f} | {arm['ttft_p50']:.3f} / {arm['ttft_p99']:.3f} | "
                     f"{same} |")
    mib = 2 ** 20
    lines += ["", "| process | cold start s | steady RSS MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
    for key, label in (("serve_mixed", f"rewrite serve, mixed, {ADAPTERS} adapters"),
                       ("serve_folded", "rewrite serve, folded"),
                       ("cli_run", "rewrite run --generate (1 token)")):
        row = result[key]
        steady = f"{row['rss_bytes'] / mib:.0f}" if "rss_bytes" in row else "-"
        lines.append(f"| {label} | {row['cold_start_s']:.2f} | {steady} | {row['peak_rss_bytes'] / mib:.0f} |")
    return "\n".join(lines)


def write_json(path: Path, results: list[dict]) -> None:
    """After each model, so a later model's failure keeps the earlier ones' figures."""
    from rewrite.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,99m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per arm, the same ones in every arm (default: tiny 128, 99m 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (library and server)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; use {', '.join(MODELS)}")
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    print(f"load average {os.getloadavg()[0]:.1f} at the start on {os.cpu_count()} cores (shared machine: read the ratios, "
          "measured in one run, rather than the absolute figures)\n")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result = measure(name, Path(tmp), args, progress)
            result["ratios"] = ratios(result, args.concurrency)
            result["agreement"] = agreement(result)
            results.append(result)
            print(table(result) + "\n", flush=True)
            if args.json:
                write_json(args.json, results)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
