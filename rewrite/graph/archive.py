"""`.pt2` archives of captured graphs: graph, weights, config, tokenizer and pass history in one zip.

Everything in an archive is data, so loading one from anyone is as safe as loading a safetensors file:
the graph is JSON node records whose operators resolve against an allow-list (`rewrite.graph.codec`),
weights are safetensors, the config is JSON read by its built-in class, and only the tokenizer's data
files are read (never custom code). Format 1 archives held a pickle and are refused unread.

The weights are stored uncompressed on a 64-byte boundary, so loading maps the parameters from the file
instead of reading them: a loaded model holds its frozen weights once, as pages of the file, and an FSDP
rank that keeps only its shards never has the whole model resident.
"""
from __future__ import annotations

import json
import math
import mmap
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.atomic import atomic_path, temp_prefix
from rewrite.graph.codec import ATTRIBUTE_PATH, UnsafeGraphError, decode_graph, encode_graph
from rewrite.graph.ir import GraphInfo, RewriteGraph, info, owner_of, wrap
from rewrite.graph.pipeline import available, pass_class

FORMAT = 2
_KEPT_META = ("nn_module_stack", "rewrite", "rewrite_train_dropout_p")
_INFO_OBJECTS = GraphInfo.OBJECTS
_TOKENIZER_FILES = (".json", ".txt", ".model")  # vocabularies, merges, sentencepiece protobufs: data only
_WEIGHTS = "weights.safetensors"
_ALIGN = 64
_MAPPED_BYTES = 2**20  # smaller tensors are read: a mapping each would cost more than it saves
_PADDING_FIELD = 0xD935  # the zip extra field that aligns a member's data (Android's zipalign uses it too)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
# safetensors' dtype names (its format specification)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unique tensors by name, and the manifest: parameters, buffers, aliases, trainable flags."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {"parameters": {}, "buffers": [], "aliases": {}}
    seen: dict[int, str] = {}
    named = [(n, t, True) for n, t in gm.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in gm.named_buffers(remove_duplicate=False)]
    for name, tensor, is_param in named:
        if id(tensor) in seen:
            manifest["aliases"][name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        tensors[name] = tensor.detach()
        if is_param:
            manifest["parameters"][name] = tensor.requires_grad
        else:
            manifest["buffers"].append(name)
    return tensors, manifest


def _graph_json(gm: fx.GraphModule) -> str:
    try:
        return json.dumps(encode_graph(gm.graph, _KEPT_META))
    except UnsafeGraphError as error:
        speed = [entry["pass"] for entry in info(gm).history
                 if entry["pass"] in available() and getattr(pass_class(entry["pass"]), "speed", None) is not None]
        hint = (f"; the training-speed passes in its history ({', '.join(speed)}) make the graph `rewrite train` "
                "steps through (it applies them itself), not one to save" if speed else "")
        raise RewriteError(f"this graph cannot be saved as a .pt2 archive: {error}{hint}") from error


def save(gm: fx.GraphModule, path: str | Path) -> Path:
    """Writes `gm` with its weights, config, tokenizer and pass history to a `.pt2` archive (atomically)."""
    path = Path(path)
    meta = info(gm)
    tensors, manifest = _tensors(gm)
    on_meta = any(t.device.type == "meta" for t in tensors.values())
    header = meta.to_dict()
    header.update(format=FORMAT, training=gm.training, tensors=manifest, meta_device=on_meta)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        archive.writestr("rewrite.json", json.dumps(header, indent=2, default=str))
        archive.writestr("graph.json", _graph_json(gm))
        if on_meta:
            shapes = {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()}
            archive.writestr("shapes.json", json.dumps(shapes))
        else:
            _write_weights(archive, tensors, path.parent)
        for key in _INFO_OBJECTS:
            if getattr(meta, key) is not None:
                with tempfile.TemporaryDirectory() as tmpdir:
                    getattr(meta, key).save_pretrained(tmpdir)
                    for file in sorted(Path(tmpdir).iterdir()):
                        archive.write(file, f"{key}/{file.name}")
    return path


def _write_weights(archive: zipfile.ZipFile, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """The weights through a temporary file (safetensors writes it from the tensors' memory, with no copy of
    the model in between), stored with padding that puts the data on an `_ALIGN`-byte boundary."""
    contiguous = {n: t.contiguous().cpu() for n, t in tensors.items()}
    with tempfile.NamedTemporaryFile(dir=directory, prefix=temp_prefix("weights-")) as tmp:
        safetensors.torch.save_file(contiguous, tmp.name)
        member = zipfile.ZipInfo(_WEIGHTS, date_time=(1980, 1, 1, 0, 0, 0))
        member.file_size = Path(tmp.name).stat().st_size
        # the local header: 30 bytes, the name, this padding field (4 + pad bytes), zip64 sizes (20 bytes)
        unpadded = archive.fp.tell() + 30 + len(_WEIGHTS) + 4 + 20
        member.extra = struct.pack("<HH", _PADDING_FIELD, -unpadded % _ALIGN) + bytes(-unpadded % _ALIGN)
        with archive.open(member, "w", force_zip64=True) as out, open(tmp.name, "rb") as source:
            shutil.copyfileobj(source, out, 2**24)


def _read_tensors(archive: zipfile.ZipFile, header: dict, mapped: set[str]) -> dict[str, torch.Tensor]:
    if header.get("meta_device"):
        shapes = json.loads(archive.read("shapes.json"))
        return {n: torch.empty(s, dtype=getattr(torch, d), device="meta") for n, (s, d) in shapes.items()}
    member = archive.getinfo(_WEIGHTS)
    if member.compress_type != zipfile.ZIP_STORED:
        return safetensors.torch.load(archive.read(member))
    return _map_weights(archive, member, mapped)


def _map_weights(archive: zipfile.ZipFile, member: zipfile.ZipInfo, mapped: set[str]) -> dict[str, torch.Tensor]:
    """The stored safetensors member's tensors: the `mapped` ones (parameters of at least `_MAPPED_BYTES`) as
    views of their own private, copy-on-write mapping of the file, which goes with the tensor (so an FSDP
    rank that swaps a parameter for its shard also drops the pages it read), the others read into memory."""
    file = archive.fp
    file.seek(member.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise ValueError(f"the local header of {_WEIGHTS} is damaged")
    start = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    data, size, entries = safetensors_header(file, start, member.file_size)
    return {name: stored_tensor(file, data, size, entry, name in mapped) for name, entry in entries.items()}


def safetensors_header(file, start: int, stored: int) -> tuple[int, int, dict]:
    """The safetensors data at `start` of the open `file`, `stored` bytes long: where its tensors' data starts, its
    size, and the header's entries by tensor name."""
    file.seek(start)
    (length,) = struct.unpack("<Q", file.read(8))
    if length > stored - 8:
        raise ValueError(f"the safetensors header of {getattr(file, 'name', _WEIGHTS)} is longer than its data")
    entries = json.loads(file.read(length))
    entries.pop("__metadata__", None)
    return start + 8 + length, stored - 8 - length, entries


def stored_tensor(file, data: int, size: int, entry: dict, map_it: bool) -> torch.Tensor:
    """The tensor a safetensors header `entry` describes, in the open `file` whose data starts at `data` and holds
    `size` bytes: with `map_it`, one of `_MAPPED_BYTES` or more is a view of its own copy-on-write mapping of the file
    (its pages come in as they are read and go with the tensor), else it is read into memory."""
    dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
    shape = [int(d) for d in entry["shape"]]
    count = math.prod(shape)
    if not 0 <= begin <= end <= size or end - begin != count * dtype.itemsize or min(shape, default=0) < 0:
        raise ValueError(f"a tensor's offsets {[begin, end]} do not fit its shape {shape} and the data")
    offset = data + begin
    if map_it and end - begin >= _MAPPED_BYTES and offset % dtype.itemsize == 0:
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            view = mmap.mmap(file.fileno(), offset + end - begin - page, offset=page, access=mmap.ACCESS_COPY)
        except OSError:  # out of file descriptors (a mapping holds one) or of mappings: read it instead
            pass
        else:
            return torch.frombuffer(view, dtype=dtype, count=count, offset=offset - page).view(shape)
    tensor = torch.empty(shape, dtype=dtype)
    file.seek(offset)
    if file.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
        raise EOFError(f"{_WEIGHTS} ends inside a tensor")
    return tensor


def _build_root(tensors: dict[str, torch.Tensor], manifest: dict) -> nn.Module:
    root = nn.Module()

    def owner(name: str) -> tuple[nn.Module, str]:
        return owner_of(root, name)

    for name, requires_grad in manifest["parameters"].items():
        module, leaf = owner(name)
        module.register_parameter(leaf, nn.Parameter(tensors[name], requires_grad=requires_grad))
    for name in manifest["buffers"]:
        module, leaf = owner(name)
        module.register_buffer(leaf, tensors[name])
    for alias, name in manifest["aliases"].items():
        module, leaf = owner(alias)
        source_module, source_leaf = owner(name)
        setattr(module, leaf, getattr(source_module, source_leaf))
    return root


def _read_config(archive: zipfile.ZipFile, source: str | None):
    """The config's JSON through its built-in class (`auto_map` and custom classes are never followed)."""
    from transformers import AutoConfig

    data = json.loads(archive.read("config/config.json"))
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    config.name_or_path = source or ""
    return config


def _read_tokenizer(archive: zipfile.ZipFile, source: str | None):
    names = [n for n in archive.namelist() if n.startswith("tokenizer/") and n.endswith(_TOKENIZER_FILES)]
    if not names:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=".rewrite-tmp-") as tmpdir:
        for name in names:
            (Path(tmpdir) / Path(name).name).write_bytes(archive.read(name))
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmpdir, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as error:  # its text names the temporary directory; shown with -v
            raise UnsafeGraphError("its tokenizer files are not a tokenizer that transformers loads without custom "
                                   "code") from error
    if source:
        tokenizer.name_or_path = source  # not the temporary directory it was read from
    return tokenizer


def _check_names(manifest: dict) -> None:
    names = [*manifest["parameters"], *manifest["buffers"], *manifest["aliases"], *manifest["aliases"].values()]
    bad = [n for n in names if not (isinstance(n, str) and ATTRIBUTE_PATH.fullmatch(n))]
    if bad:
        raise UnsafeGraphError(f"tensor name {bad[0]!r} is not a dotted attribute path")


def _read(archive: zipfile.ZipFile) -> RewriteGraph:
    header = json.loads(archive.read("rewrite.json"))
    if header.get("format") != FORMAT:
        raise UnsafeGraphError(
            f"it has archive format {header.get('format')!r}, not {FORMAT} (format 1 held a pickle, which could run "
            "code, so it is not read)")
    manifest = header.pop("tensors")
    _check_names(manifest)
    graph = decode_graph(json.loads(archive.read("graph.json")),
                         {*manifest["parameters"], *manifest["buffers"], *manifest["aliases"]})
    root = _build_root(_read_tensors(archive, header, set(manifest["parameters"])), manifest)
    training = bool(header.pop("training"))
    header.pop("format")
    if "config/config.json" in archive.namelist():
        header["config"] = _read_config(archive, header.get("source"))
    header["tokenizer"] = _read_tokenizer(archive, header.get("source"))
    gm = wrap(root, graph, header, training)
    _keep_unread(gm, root)
    return gm


def _keep_unread(gm: fx.GraphModule, root: nn.Module) -> None:
    """Tensors no node reads stay with the graph (`fx.GraphModule` copies only what its nodes read): a method's
    bookkeeping, such as the initial factors a PiSSA branch converts its adapter file with."""
    held = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    held |= {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    for name, tensor in root.named_parameters(remove_duplicate=False):
        if name not in held:
            module, leaf = owner_of(gm, name)
            module.register_parameter(leaf, tensor)
    for name, tensor in root.named_buffers(remove_duplicate=False):
        if name not in held:
            module, leaf = owner_of(gm, name)
            module.register_buffer(leaf, tensor)


def load(path: str | Path) -> RewriteGraph:
    """Reads a `.pt2` archive written by `save`; nothing in the file is executed, whoever made it."""
    path = Path(path)
    if not path.is_file():
        raise RewriteError(f"graph archive {str(path)!r} does not exist; create one with `rewrite capture`")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read(archive)
    except RewriteError:
        raise
    except (zipfile.BadZipFile, UnsafeGraphError, KeyError, IndexError, EOFError, json.JSONDecodeError,
            UnicodeDecodeError, safetensors.SafetensorError, OSError, AttributeError, TypeError, ValueError,
            RuntimeError) as error:
        raise RewriteError(
            f"{str(path)!r} is not a readable rewrite graph archive ({type(error).__name__}: {error}); "
            "it may be truncated, corrupt or from an older version: re-create it with `rewrite capture`"
        ) from error
