"""`rewrite serve MODEL.onnx`: an OpenAI-style HTTP server over an exported model (see `rewrite.serve`)."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from rewrite.errors import RewriteError

log = logging.getLogger(__name__)


def _named_adapters(pairs: tuple[str, ...], directory: str | None) -> dict[str, str]:
    """`--adapter NAME=FILE` pairs, then every `.onnx_adapter` file of `--adapter-dir` under its stem."""
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise RewriteError(f"--adapter {pair!r} is not NAME=FILE; give a name, '=' and an .onnx_adapter file")
        adapters[name] = path
    if directory is not None:
        found = sorted(Path(directory).glob("*.onnx_adapter"))
        if not found:
            raise RewriteError(f"--adapter-dir {directory!r} holds no .onnx_adapter files; make them with "
                               "`rewrite adapter export`")
        adapters |= {path.stem: str(path) for path in found if path.stem not in adapters}
    return adapters


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("--adapter", "adapter_pairs", multiple=True, metavar="NAME=FILE",
              help="Serve an .onnx_adapter file as model NAME, repeatable.")
@click.option("--adapter-dir", type=click.Path(file_okay=False, exists=True),
              help="Serve every .onnx_adapter file in this directory, named by its stem.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most requests decoded together (rows per ONNX Runtime call).")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most requests waiting for a row; past it, 429.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body; past it, 413.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds SIGTERM waits for requests in flight before cancelling them (default: until they finish).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--served-model-name", default=None, help="The base model's name in the API (default: its directory's).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(file_okay=False),
              help="Tokenizer directory (default: the model's).")
def serve(model: str, adapter_pairs: tuple[str, ...], adapter_dir: str | None, host: str, port: int, max_batch: int,
          max_queue: int, max_body_bytes: int, drain_timeout: float | None, threads: int | None,
          served_model_name: str | None,
          tokenizer_dir: str | None) -> None:
    """Serve MODEL.onnx over HTTP as OpenAI's completions API (a model exported --with-cache; with
    --mixed-adapters, requests of all adapters share each step) or /v1/classify (classifiers, fill-mask).

    SIGTERM or Ctrl-C stops taking requests, finishes those in flight, then exits 0.
    """
    import uvicorn

    from rewrite.serve.app import Config, create_app

    config = Config(Path(model), _named_adapters(adapter_pairs, adapter_dir), served_model_name, tokenizer_dir,
                    max_batch, max_queue, threads, max_body_bytes)
    app = create_app(config)
    engine = app.state.service.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # refuse new requests (503) while in-flight ones finish
            if engine is not None:
                engine.drain()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_timeout))
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn raises the signal again after its graceful shutdown
        signal.signal(sig, lambda *_: None)
    server.run()
    log.info("served %s; stopped after finishing the requests in flight", model)
