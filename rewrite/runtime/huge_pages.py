"""Huge pages for the memory a session loads a model into.

A decoding step reads every weight once. In 4 KiB pages that is a page walk every 4 KiB of weights, up to several
percent of an int4 step on the 124.7M LLaMA shape (`benchmarks/genai_decode.py`). Linux backs anonymous memory with
2 MiB pages only where a program asks, when its transparent huge pages are in `madvise` mode (Ubuntu's default), and
ONNX Runtime does not ask. So around a session's load (`backed_by_huge_pages`), the anonymous mappings the load
created or grew, where ONNX Runtime put the weights it read and prepacked, are advised (`MADV_HUGEPAGE`) and
collapsed into huge pages at once (`MADV_COLLAPSE`, Linux 6.1+): memory that existed before is left alone (so
weights a load puts where the process had freed memory keep their pages; a fresh process, as `rewrite serve` is, has
none), and the resident size grows at most by the rest of a 2 MiB page that the load wrote only part of. Best
effort: on other systems, in `always` mode (huge already) or `never` mode (the administrator's choice), or where
the kernel refuses, nothing changes.
"""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Iterator

HUGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The system's transparent huge page mode (`always`, `madvise`, `never`), None where there is none."""
    try:
        words = THP_MODE.read_text().split()
    except OSError:
        return None
    return next((word.strip("[]") for word in words if word.startswith("[")), None)


def anonymous_regions() -> list[tuple[int, int]]:
    """This process's private writable memory that no file backs (the heap and anonymous mappings): `(start, end)`."""
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if fields[1].startswith("rw") and fields[1].endswith("p") and (len(fields) < 6 or fields[5] == "[heap]"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            regions.append((start, end))
    return regions


def new_parts(region: tuple[int, int], before: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `region` that none of the regions `before` covered."""
    parts = [region]
    for old_start, old_end in (old for old in before if old[0] < region[1] and old[1] > region[0]):
        parts = [piece for start, end in parts
                 for piece in ((start, min(end, old_start)), (max(start, old_end), end)) if piece[0] < piece[1]]
    return parts


@cache
def _madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def collapse(start: int, end: int) -> int:
    """Backs the whole 2 MiB pages inside `[start, end)` with huge pages; the bytes it did (0 where it could not)."""
    low, high = -(-start // HUGE) * HUGE, end // HUGE * HUGE
    if high <= low:
        return 0
    madvise = _madvise()
    if madvise(low, high - low, MADV_HUGEPAGE) or madvise(low, high - low, MADV_COLLAPSE):
        return 0
    return high - low


@contextmanager
def backed_by_huge_pages() -> Iterator[None]:
    """The anonymous memory allocated inside the block ends up in huge pages where the system asks for advice."""
    if not sys.platform.startswith("linux") or thp_mode() != "madvise":
        yield
        return
    before = anonymous_regions()
    yield
    for region in anonymous_regions():
        for start, end in new_parts(region, before):
            collapse(start, end)
