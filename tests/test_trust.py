"""Untrusted input runs no code: crafted `.pt2` archives and model directories with custom code."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import pytest

import rewrite

from helpers import capture_tiny, run_cli


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_sentence(done, match):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and match in lines[0], done.stderr


def _pickle_archive(path, marker):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("rewrite.json", json.dumps({"format": 1, "training": False}))
        archive.writestr("graph.pkl", pickle.dumps(_Payload(marker)))


def test_a_pickle_payload_archive_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    _pickle_archive(tmp_path / "evil.pt2", marker)
    with pytest.raises(rewrite.RewriteError, match="format 1 held a pickle, which could run code"):
        rewrite.load(tmp_path / "evil.pt2")
    _one_sentence(run_cli("inspect", tmp_path / "evil.pt2"), "is not a readable rewrite graph archive")
    assert not marker.exists()


def _edit_graph(path, edit, marker):
    """Rewrites an archive's graph.json through `edit(graph_data)`; MARK in it becomes `marker`."""
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    graph = json.loads(parts["graph.json"])
    edit(graph)
    parts["graph.json"] = json.dumps(graph).replace("MARK", str(marker)).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)


def _first(graph, op):
    return next(n for n in graph["nodes"] if n["op"] == op)


@pytest.mark.parametrize("edit, reason", [
    (lambda g: _first(g, "call_function").update(target={"$fn": "os.system"}), "not on the allow-list"),
    (lambda g: _first(g, "call_function").update(target={"$op": "builtins::eval.default"}), "namespace 'builtins'"),
    (lambda g: _first(g, "placeholder").update(target="x=__import__('os').system('touch MARK')"), "placeholder"),
    (lambda g: _first(g, "get_attr").update(target='a"); __import__("os").system("touch MARK"); ("'), "get_attr"),
    (lambda g: g["codegen"].update(orig_args=["x=__import__('os').system('touch MARK')"]), "not a Python identifier"),
    (lambda g: g["codegen"]["out_spec"].update(type="os.system"), "not a builtin container"),
    (lambda g: _first(g, "call_function")["meta"].update({"$dict": [["stack_trace", "a\nimport os"]]}), "line break"),
    (lambda g: _first(g, "call_function").update(op="call_module", target="os"), "call_module"),
])
def test_crafted_graph_records_are_refused(make_tiny, tmp_path, edit, reason):
    path = tmp_path / "g.pt2"
    rewrite.save(capture_tiny(make_tiny("gpt2")), path)
    _edit_graph(path, edit, tmp_path / "marker")
    with pytest.raises(rewrite.RewriteError, match=reason):
        rewrite.load(path)
    assert not (tmp_path / "marker").exists()


def _custom_code_dir(tiny_bert_dir, tmp_path, marker):
    directory = tmp_path / "custom"
    shutil.copytree(tiny_bert_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return directory


def test_a_model_directory_with_custom_code_runs_nothing_and_never_prompts(tiny_bert_dir, tmp_path):
    marker = tmp_path / "marker"
    directory = _custom_code_dir(tiny_bert_dir, tmp_path, marker)
    with pytest.raises(rewrite.RewriteError, match="needs custom code .* which rewrite does not run"):
        rewrite.load_pretrained(directory)
    done = run_cli("capture", directory, "-o", tmp_path / "out.pt2")
    _one_sentence(done, "needs custom code")
    assert done.stdout == "" and not marker.exists() and not (tmp_path / "out.pt2").exists()
