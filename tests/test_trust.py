"""Untrusted input runs no code: crafted `.pt2` archives and model directories with custom code."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import pytest

import rewrite

from helpers import capture_tiny, fresh_inputs, run_cli
from rewrite.graph.codec import PYTHON_FUNCTIONS


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


def _in_front(graph, records):
    """Inserts `records` after the graph's inputs and weights, before its first computation."""
    at = next(i for i, n in enumerate(graph["nodes"]) if n["op"] not in ("placeholder", "get_attr"))
    graph["nodes"][at:at] = records


def _record(name, target, *args):
    return {"op": "call_function", "name": name, "target": target, "args": {"$tuple": list(args)},
            "kwargs": {"$dict": []}, "meta": {"$dict": []}}


CODE = "open('MARK', 'w').write('ran')"


def _gadget(fn_get, fn_call):
    """The chain from a weight to `eval`: attribute walk, call, two lookups, a call with code."""
    return lambda g: _in_front(g, [
        _record("g1", {"$fn": fn_get}, "__class__.__repr__.__globals__"),
        _record("g2", {"$fn": fn_call}, {"$node": "g1"}, {"$node": "transformer_wte_weight"}),
        _record("g3", {"$fn": "operator.getitem"}, {"$node": "g2"}, "__builtins__"),
        _record("g4", {"$fn": "operator.getitem"}, {"$node": "g3"}, "eval"),
        _record("g5", {"$fn": fn_call}, {"$node": "g4"}, CODE),
    ])


@pytest.fixture(scope="module")
def gpt2_archive(tmp_path_factory):
    from conftest import tiny_model

    path = tmp_path_factory.mktemp("gpt2") / "clean.pt2"
    rewrite.save(capture_tiny(tiny_model("gpt2")), path)
    return path


def test_the_attrgetter_gadget_chain_is_refused_by_every_command(gpt2_archive, tmp_path):
    marker = tmp_path / "marker"
    path = shutil.copy(gpt2_archive, tmp_path / "evil.pt2")
    _edit_graph(path, _gadget("operator.attrgetter", "operator.call"), marker)
    with pytest.raises(rewrite.RewriteError, match="'operator.attrgetter' is not on the allow-list"):
        rewrite.load(path)
    (tmp_path / "train.tsv").write_text("text\tlabel\nw1 w2\t1\n")
    for argv in (["inspect", path], ["export", path, "--onnx", tmp_path / "m.onnx"],
                 ["train", path, "--data", tmp_path / "train.tsv", "--output-dir", tmp_path / "run"],
                 ["fold", path, "-o", tmp_path / "f.pt2"]):
        _one_sentence(run_cli(*argv), "is not on the allow-list")
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2", "train.tsv"]


def _runs_or_fails(path, inputs):
    """Loads the archive and runs it; a refusal or an error from a value of the wrong type are both fine."""
    try:
        gm = rewrite.load(path)
    except rewrite.RewriteError:
        return "refused"
    try:
        gm(**inputs)
    except Exception:  # noqa: BLE001 - any failure is fine, only running the code is not
        return "failed"
    return "ran"


@pytest.mark.parametrize("name", sorted(PYTHON_FUNCTIONS))
def test_gadget_chains_through_every_admitted_callable_run_no_code(gpt2_archive, tmp_path, name):
    """Each admitted callable in the place of both `attrgetter` and `call`: the chain loads (every link is
    admitted) and fails on a value of the wrong type, or is refused; it never reaches `eval`."""
    marker = tmp_path / "marker"
    for chain in (_gadget(name, name), _gadget(name, "operator.getitem"), _gadget("operator.getitem", name)):
        path = shutil.copy(gpt2_archive, tmp_path / "g.pt2")
        _edit_graph(path, chain, marker)
        assert _runs_or_fails(path, fresh_inputs()) in ("refused", "failed")
    assert not marker.exists()


@pytest.mark.parametrize("edit, reason", [
    (_gadget("operator.methodcaller", "operator.call"), "'operator.methodcaller' is not on the allow-list"),
    (lambda g: _in_front(g, [_record("f", {"$op": "aten::from_file.default"}, "MARK", True, 64)]),
     "acts outside its tensor arguments"),
    (lambda g: _in_front(g, [_record("f", {"$op": "aten::set_.source_Tensor"}, {"$node": "transformer_wte_weight"},
                                     {"$node": "transformer_wpe_weight"})]), "acts outside its tensor arguments"),
    (lambda g: _in_front(g, [_record("f", {"$op": "aten::__class__.__init__"})]), "not a registered PyTorch operator"),
    (lambda g: _in_front(g, [_record("f", {"$op": "aten::add.Tensor; import os"})]), "not an operator name"),
    (lambda g: _first(g, "get_attr").update(target="forward.__globals__"), "get_attr"),
    (lambda g: _first(g, "placeholder").update(args={"$tuple": [CODE]}), "placeholder"),
    (lambda g: g["codegen"].update(orig_args=["import", "attention_mask"]), "not a Python identifier"),
    (lambda g: g["codegen"]["out_spec"].update(type="transformers.models.nope.modeling_nope.Out"),
     "not a ModelOutput of the installed"),
    (lambda g: g["codegen"]["out_spec"].update(type="rewrite.cli.main.main"), "not a builtin container"),
    (lambda g: g["nodes"].append(dict(g["nodes"][0])), "two nodes are named"),
    (lambda g: _first(g, "call_function").update(args={"$tuple": [{"$node": "nowhere"}]}), "names no earlier node"),
    (lambda g: _first(g, "call_function").update(args={"$tuple": [{"$code": CODE}]}), "not known"),
    (lambda g: _first(g, "call_function").update(target={"$fn": "os.system"}), "not on the allow-list"),
    (lambda g: _first(g, "call_function").update(target={"$op": "builtins::eval.default"}), "namespace 'builtins'"),
    (lambda g: _first(g, "call_function").update(target={"$op": "rewrite::matmul_nbits_v2.default"}),
     "namespace 'rewrite'"),  # the project's one custom operator is admitted by its exact name, not its namespace
    (lambda g: _first(g, "placeholder").update(target="x=__import__('os').system('touch MARK')"), "placeholder"),
    (lambda g: _first(g, "get_attr").update(target='a"); __import__("os").system("touch MARK"); ("'), "get_attr"),
    (lambda g: g["codegen"].update(orig_args=["x=__import__('os').system('touch MARK')"]), "not a Python identifier"),
    (lambda g: g["codegen"]["out_spec"].update(type="os.system"), "not a builtin container"),
    (lambda g: _first(g, "call_function")["meta"].update({"$dict": [["stack_trace", "a\nimport os"]]}), "line break"),
    (lambda g: _first(g, "call_function").update(op="call_module", target="os"), "call_module"),
])
def test_crafted_graph_records_are_refused(gpt2_archive, tmp_path, edit, reason):
    path = shutil.copy(gpt2_archive, tmp_path / "g.pt2")
    _edit_graph(path, edit, tmp_path / "marker")
    with pytest.raises(rewrite.RewriteError, match=reason) as error:
        rewrite.load(path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "marker").exists()


_PAYLOADS = ["MARK", CODE, "__import__('os').system('touch MARK')", "x=1)\nopen('MARK','w'", "__globals__",
             "__class__.__repr__.__globals__", "__builtins__", "eval", "transformer.wte.weight", "forward.__globals__"]
_TARGETS = [*PYTHON_FUNCTIONS, "operator.attrgetter", "operator.methodcaller", "operator.call", "builtins.eval",
            "builtins.exec", "os.system", "torch.load", "importlib.import_module"]
_OPS = ["aten::add.Tensor", "aten::mul.Tensor", "aten::from_file.default", "aten::_print.default", "aten::copy_.default",
        "aten::embedding.default", "builtins::eval.default", "aten::format.default", "prims::view_of.default"]


def _fuzzed_records(draw_names):
    from hypothesis import strategies as st

    names = st.sampled_from(draw_names)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=False, width=32),
                        st.sampled_from(_PAYLOADS))
    values = st.recursive(
        st.one_of(scalars, names.map(lambda n: {"$node": n}), st.sampled_from(["float32", "load", "int64"]).map(
            lambda t: {"$torch": t}), st.sampled_from(["cpu", "meta", "MARK"]).map(lambda d: {"$device": d})),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(lambda v: {"$tuple": v}),
                                st.lists(st.tuples(scalars, inner).map(list), max_size=2).map(lambda v: {"$dict": v}),
                                st.lists(inner, min_size=3, max_size=3).map(lambda v: {"$slice": v})),
        max_leaves=6)
    targets = st.one_of(st.sampled_from(_TARGETS).map(lambda t: {"$fn": t}), st.sampled_from(_OPS).map(
        lambda t: {"$op": t}), st.sampled_from(_PAYLOADS + ["output", "input_ids"]))
    record = st.fixed_dictionaries({
        "op": st.sampled_from(["call_function", "call_function", "get_attr", "placeholder", "call_method",
                               "call_module", "output", "root"]),
        "name": st.one_of(st.sampled_from(["g1", "g2", "g3", "torch", "self", "import", "getitem"]),
                          st.sampled_from(_PAYLOADS)),
        "target": targets, "args": values.map(lambda v: {"$tuple": v if isinstance(v, list) else [v]}),
        "kwargs": st.lists(st.tuples(st.sampled_from(["x", "dim", "x=1", "import"]), values).map(list),
                           max_size=2).map(lambda v: {"$dict": v}),
        "meta": st.just({"$dict": []}),
    })
    return st.lists(record, min_size=1, max_size=4)


def test_fuzzed_graph_records_run_no_code(gpt2_archive, tmp_path):
    """Random records over node kinds, targets (admitted, gadget and code strings) and arguments, in front of a
    real graph: each archive is refused, or loads and runs or fails; no marker file ever appears. Two explicit
    examples make sure both a refusal and a run that fails are among them, whatever Hypothesis draws."""
    from hypothesis import HealthCheck, example, given, settings

    marker = tmp_path / "marker"
    clean = gpt2_archive
    inputs = fresh_inputs()
    outcomes = set()

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_fuzzed_records(["g1", "g2", "input_ids", "transformer_wte_weight", "nowhere"]))
    @example([_record("g1", {"$fn": "operator.getitem"}, {"$node": "transformer_wte_weight"}, "__globals__")])
    @example([_record("g1", {"$fn": "operator.attrgetter"}, "__class__.__repr__.__globals__")])
    def check(records):
        path = tmp_path / "fuzzed.pt2"
        shutil.copy(clean, path)
        _edit_graph(path, lambda g: _in_front(g, records), marker)
        outcomes.add(_runs_or_fails(path, inputs))
        assert not marker.exists()

    check()
    assert "refused" in outcomes and "failed" in outcomes


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
