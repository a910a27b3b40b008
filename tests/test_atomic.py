"""Outputs are written as other tools write them: modes follow the umask, and a write the file system
refuses (a read-only directory, a full disk) is one sentence naming the output, never a temporary. A
training checkpoint, which every rank writes a part of, is visible only when whole."""
from __future__ import annotations

import errno
import io
import os
import re
import socket
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import rewrite
from rewrite.training import checkpoint, distributed
from rewrite.atomic import TMP_PREFIX
from rewrite.cli.main import main
from rewrite.errors import RewriteError

from helpers import checkpoint_tensors


@pytest.fixture(scope="module")
def graph(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    rewrite.apply(gm, "lora", rank=2, alpha=4, roles=["q"])
    return gm


@pytest.fixture
def umask():
    """Lets a test set the process umask, and restores it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(graph, tmp_path, umask, mask):
    umask(mask)
    rewrite.save(graph, tmp_path / "g.pt2")
    rewrite.save_adapter(graph, tmp_path / "adapter")
    step = checkpoint.write(tmp_path / "checkpoints", 1, _shards, {"world_size": 1}, keep=1)
    assert _mode(tmp_path / "g.pt2") == 0o666 & ~mask
    assert _mode(tmp_path / "adapter" / "adapter_model.safetensors") == 0o666 & ~mask
    assert _mode(step) == 0o777 & ~mask
    assert {p.name: _mode(p) for p in step.iterdir()} == {
        name: 0o666 & ~mask for name in (checkpoint.METADATA_NAME, "__0_0.distcp", checkpoint.STATE_NAME,
                                          checkpoint.INFO_NAME)}


def _shards(directory) -> None:
    dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=directory)


def test_a_checkpoint_is_visible_only_when_whole(tmp_path):
    def cut_short(directory):
        _shards(directory)
        raise KeyboardInterrupt

    root = tmp_path / "checkpoints"
    checkpoint.write(root, 1, _shards, {"world_size": 1}, keep=2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write(root, 2, cut_short, {"world_size": 1}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]


def _refused(**kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))  # what a directory rank 0 may not write to does


def _rank_writes(rank: int, port: int, root: str, refuse: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    if refuse and ctx.main:
        tempfile.mkdtemp = _refused
    try:
        checkpoint.write(Path(root), 1, lambda directory: dcp.save({f"rank{rank}": torch.full((2,), rank)},
                                                                   checkpoint_id=directory),
                         {"world_size": 2}, keep=1, ctx=ctx)
        outcome = "written"
    except OSError as error:
        outcome = type(error).__name__
    Path(root).with_name(f"rank{rank}").write_text(outcome)
    ctx.close()


@pytest.mark.slow
@pytest.mark.parametrize("refuse", [False, True])
def test_two_ranks_write_one_checkpoint_or_both_fail(tmp_path, refuse):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "checkpoints"
    mp.spawn(_rank_writes, args=(port, str(root), refuse), nprocs=2)
    outcomes = [(tmp_path / f"rank{rank}").read_text() for rank in range(2)]
    if refuse:
        assert outcomes == ["PermissionError"] * 2 and not any(root.iterdir())
        return
    assert outcomes == ["written"] * 2 and sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    step = root / "step-00000001"
    assert {p.name for p in step.iterdir()} == {checkpoint.METADATA_NAME, "__0_0.distcp", "__1_0.distcp",
                                                 checkpoint.STATE_NAME, checkpoint.INFO_NAME}
    whole = checkpoint_tensors(step)
    assert torch.equal(whole["rank0"], torch.zeros(2)) and torch.equal(whole["rank1"], torch.ones(2))


def test_a_checkpoint_without_its_index_is_unreadable(tmp_path):
    step = checkpoint.write(tmp_path, 1, _shards, {"world_size": 1, "scheduler": {}, "rng": []}, keep=1)
    assert checkpoint.read(step).shapes == {"w": (2,)}
    (step / checkpoint.METADATA_NAME).unlink()
    with pytest.raises(checkpoint.Unreadable, match=re.escape(
            f"checkpoint {str(step)!r} is unreadable ({checkpoint.METADATA_NAME} is missing)")):
        checkpoint.read(step)


def _leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_full_disk_names_the_output(graph, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    target = tmp_path / "g.pt2"
    with pytest.raises(RewriteError) as error:
        rewrite.save(graph, target)
    assert str(error.value) == (f"output {str(target)!r} could not be written (no space left on device); free some "
                                "space or write elsewhere")
    assert not target.exists() and not _leftovers(tmp_path)


def test_read_only_directory_names_the_output_not_the_temporary(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mkstemp = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):  # what a directory without write permission does (we run as root)
        if dir is not None and os.path.samefile(dir, read_only):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, TMP_PREFIX + "1-x"))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(sys, "argv", ["rewrite", "capture", str(tiny_bert_dir), "-o", str(read_only / "g.pt2")])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit:
        main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1:] == [
        f"error: output {str(read_only / 'g.pt2')!r} could not be written (permission denied); write to a directory "
        "you may write to"], err
    assert TMP_PREFIX not in err and not list(read_only.iterdir())


def test_unwritable_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else access(path, mode))
    with pytest.raises(RewriteError, match=rf"output directory '{tmp_path}/out' cannot be written: '{tmp_path}' is "
                                           "not writable"):
        rewrite.atomic.check_output_dir(tmp_path / "out", overwrite=False)
