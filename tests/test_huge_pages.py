"""Huge pages for the memory a generation session loads its weights into (`rewrite.runtime.huge_pages`): what a load
allocates goes in 2 MiB pages where the system waits to be asked (`madvise` mode), memory from before is left alone,
pages the load never touched stay out of memory, the administrator's `never` is respected, a one-run `generate` keeps its cheaper load, and
generation is unchanged."""
from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

import rewrite
from rewrite.runtime import huge_pages
from rewrite.runtime.generate import CachedModel, stream

from test_kv_cache import byte_tokenizer, tiny_lm

MiB = 1 << 20


def _allocate(size: int, written: int | None = None) -> tuple[mmap.mmap, int]:
    """Private anonymous memory and its start, its first `written` bytes (all by default) written so they are
    resident, as ONNX Runtime allocates (numpy would advise its own); written a MiB at a time, so no large temporary
    joins in. A read-only page on either side keeps the kernel from merging it with a neighbour's mapping."""
    memory = mmap.mmap(-1, size + 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(memory, np.uint8).ctypes.data
    protect = ctypes.CDLL(None).mprotect
    protect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (base, base + mmap.PAGESIZE + size):
        assert protect(guard, mmap.PAGESIZE, mmap.PROT_READ) == 0
    for offset in range(0, size if written is None else written, MiB):
        memory[mmap.PAGESIZE + offset:mmap.PAGESIZE + offset + MiB] = ONES
    return memory, base + mmap.PAGESIZE


def _sizes(start: int, size: int) -> dict[str, int]:
    """The sizes `/proc/self/smaps` gives, summed over the mappings inside `[start, start + size)`, in bytes."""
    sizes, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            inside = start <= low and high <= start + size
        elif inside and len(fields) == 3 and fields[2] == "kB":
            sizes[fields[0][:-1]] = sizes.get(fields[0][:-1], 0) + int(fields[1]) * 1024
    return sizes


def _collapses_here() -> bool:
    """Linux in `madvise` mode whose kernel collapses on request (`MADV_COLLAPSE`, 6.1+)."""
    if not sys.platform.startswith("linux") or huge_pages.thp_mode() != "madvise":
        return False
    _probe, start = _allocate(8 * MiB)
    return huge_pages.collapse(start, start + 8 * MiB) > 0


MiB = 1 << 20
ONES = b"\1" * MiB
needs_collapse = pytest.mark.skipif(not _collapses_here(), reason="needs Linux with transparent huge pages in "
                                                                   "madvise mode and MADV_COLLAPSE (6.1+)")


def test_new_parts_are_what_no_earlier_region_covered():
    assert huge_pages.new_parts((0, 100), []) == [(0, 100)]
    assert huge_pages.new_parts((0, 100), [(0, 40)]) == [(40, 100)]  # a heap that grew
    assert huge_pages.new_parts((0, 100), [(20, 30), (60, 70), (200, 300)]) == [(0, 20), (30, 60), (70, 100)]
    assert huge_pages.new_parts((0, 100), [(0, 100)]) == []


@needs_collapse
def test_memory_allocated_in_the_block_goes_in_huge_pages_and_earlier_memory_stays():
    _earlier, earlier = _allocate(48 * MiB)
    with huge_pages.backed_by_huge_pages():
        _loaded, loaded = _allocate(16 * MiB)
        _partly, partly = _allocate(16 * MiB, written=7 * MiB)
    assert _sizes(earlier, 48 * MiB)["AnonHugePages"] == 0
    assert 14 * MiB <= _sizes(loaded, 16 * MiB)["AnonHugePages"] <= 16 * MiB  # its whole 2 MiB pages
    assert _sizes(loaded, 16 * MiB)["Rss"] == 16 * MiB
    # the 2 MiB page the load's writing ended in is filled; the pages after it, never touched, stay out of memory
    assert 6 * MiB <= _sizes(partly, 16 * MiB)["AnonHugePages"] <= _sizes(partly, 16 * MiB)["Rss"] <= 9 * MiB


@needs_collapse
def test_a_system_set_to_never_is_left_alone(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    with huge_pages.backed_by_huge_pages():
        _loaded, loaded = _allocate(16 * MiB)
    assert _sizes(loaded, 16 * MiB)["AnonHugePages"] == 0


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A LLaMA with 8 MiB of weights, exported with the cache (lowered)."""
    tmp = tmp_path_factory.mktemp("wide")
    tiny_lm("llama", transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              initializer_range=0.2)).save_pretrained(tmp / "hf")
    path = tmp / "onnx" / "model.onnx"
    rewrite.export_onnx(rewrite.load_pretrained(tmp / "hf"), path, cache=True)
    byte_tokenizer().save_pretrained(path.parent)
    return path


LOAD = """
import sys
from pathlib import Path
from rewrite.runtime.generate import CachedModel, generate
def huge():
    return next(int(l.split()[1]) for l in Path("/proc/self/smaps_rollup").read_text().splitlines()
                if l.startswith("AnonHugePages")) * 1024
before = huge()
if sys.argv[2] == "generate":
    generate(sys.argv[1], ["one run"], max_new_tokens=2)
else:
    CachedModel(sys.argv[1], huge_pages=sys.argv[2] == "kept")
print(huge() - before)
"""


@needs_collapse
@pytest.mark.parametrize("how, gained", [("kept", 4 * MiB), ("small pages", 0), ("generate", 0)])
def test_a_kept_model_loads_its_weights_in_huge_pages_and_a_single_generate_does_not(wide_llama, how, gained):
    """In a fresh process, as `rewrite serve` loads its model (memory a process freed and a load reuses stays in the
    pages it had)."""
    done = subprocess.run([sys.executable, "-c", LOAD, str(wide_llama), how], capture_output=True, text=True,
                          check=True)
    added = int(done.stdout.split()[-1])
    assert added >= gained if gained else added == 0


def test_generation_is_the_same_in_either_pages(wide_llama):
    texts = ["a wide model", "in huge pages"]
    runs = [list(stream(CachedModel(wide_llama, huge_pages=pages), texts, max_new_tokens=6)) for pages in (True, False)]
    for (tokens, logits), (other_tokens, other_logits) in zip(*runs, strict=True):
        np.testing.assert_array_equal(tokens, other_tokens)
        np.testing.assert_array_equal(logits, other_logits)
