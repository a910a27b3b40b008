"""ONNX models with adapter slots, and ONNX Runtime adapter files (`.onnx_adapter`) that fill them.

Export: each slot (see `rewrite.adapters.slots`) is a graph input under its exact tensor name that is also
an initializer holding the no-adapter default, which is how ONNX Runtime's `LoraAdapter` overrides it.
LoRA slots have a dynamic `rank` axis and default to rank 0, so the model runs as the plain base. A
mixed model stacks `adapters` on a leading axis and takes an `adapter_index` input, one per row.
The slots, the rank limit and a fingerprint of the base weights travel in the model's metadata, so an
adapter file is checked against them (names, shapes, dtypes, base model) before anything runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx

from rewrite.adapters import slots as adapter_slots
from rewrite.adapters.peft_files import read_adapter_dir
from rewrite.adapters.slots import INDEX, SlotValues, python_name
from rewrite.errors import RewriteError
from rewrite.graph.pipeline import implements
from rewrite.atomic import atomic_path
from rewrite.runtime.adapters import check
from rewrite.runtime.schema import SlotLayout, slots_metadata

EXAMPLE_RANK = 2


class SlotExport:
    """The graph `export_onnx` traces instead of the model, its extra inputs, and the ONNX fix-up after."""

    def __init__(self, gm: fx.GraphModule, *, mixed: bool, max_rank: int, traced: fx.GraphModule | None = None,
                 example: dict | None = None, base: fx.GraphModule | None = None):
        """`traced`: a graph built from `gm` by the same passes (the KV-cache graph) that gets the slots instead,
        and `example` its keyword inputs; the slots, defaults and base fingerprint stay `gm`'s, so one adapter
        file serves both exports. `base`: the graph `gm` was converted from at export (quantized, fp16), whose
        fingerprint the model carries, so the adapter files made for its float export fill these slots too."""
        if not isinstance(max_rank, int) or max_rank < 1:
            raise RewriteError(f"max rank {max_rank!r} is not allowed; use a whole number of at least 1")
        prepared, slots = adapter_slots.prepared(gm)
        self.layout = SlotLayout(slots, mixed, max_rank, adapter_slots.fingerprint(*(
            adapter_slots.prepared(base) if base is not None else (prepared, slots))))
        # ONNX Runtime's batched MatMul leaves rank-0 products unset, so stacked slots default to a zero rank-1 branch
        self.defaults = adapter_slots.defaults(prepared, slots, rank=1 if mixed else 0)
        self.values = adapter_slots.values(gm)
        if traced is not None:
            prepared, traced_slots = adapter_slots.prepared(traced)
            if traced_slots != slots:
                raise RewriteError("the graph with a cache has other adapter slots than the captured graph; "
                                   "export it with the cache or with slots, not both")
        self.graph = adapter_slots.mixed(prepared, slots, example) if mixed else adapter_slots.slotted(prepared, slots)

    def input_names(self) -> list[str]:
        """The slot inputs' keywords in the traced graph, in order (`finish` gives them their real names)."""
        return [python_name(s.name) for s in self.layout.slots] + ([INDEX] if self.layout.mixed else [])

    def onnx_input_names(self) -> list[str]:
        """The slot inputs as the written model names them: each slot's tensor name, then `adapter_index`."""
        return [s.name for s in self.layout.slots] + ([INDEX] if self.layout.mixed else [])

    def _stack(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0) if self.layout.mixed else tensor

    def example_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """Rank-2 LoRA slots (0 and 1 would be specialized away), two stacked adapters when mixed."""
        inputs = {}
        for slot in self.layout.slots:
            shape = [EXAMPLE_RANK if d is None else d for d in slot.shape]
            value = torch.zeros(shape, dtype=getattr(torch, slot.dtype))
            inputs[python_name(slot.name)] = value.expand(2, *shape).clone() if self.layout.mixed else value
        if self.layout.mixed:
            inputs[INDEX] = torch.zeros(batch, dtype=torch.long)
        return inputs

    def dynamic_shapes(self) -> dict[str, dict[int, str] | None]:
        shift = 1 if self.layout.mixed else 0
        shapes: dict[str, dict[int, str] | None] = {}
        for slot in self.layout.slots:
            axes = {shift + i: "rank" for i, d in enumerate(slot.shape) if d is None}
            shapes[python_name(slot.name)] = ({0: "adapters"} | axes if self.layout.mixed else axes) or None
        if self.layout.mixed:
            shapes[INDEX] = {0: "batch"}
        return shapes

    def verify_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """The model's own adapter fed through the slots: ONNX Runtime then must match torch on `gm`."""
        feeds = {name: self._stack(value).numpy() for name, value in self.values.items()}
        if self.layout.mixed:
            feeds[INDEX] = np.zeros(batch, dtype=np.int64)
        return feeds

    def finish(self, path: Path) -> None:
        """Gives slot inputs their exact names and no-adapter defaults, and writes the layout into the metadata."""
        model = onnx.load(str(path), load_external_data=False)
        renames = {python_name(s.name).lower(): s.name for s in self.layout.slots}  # the exporter lowercases them
        for node in model.graph.node:
            node.input[:] = [renames.get(name.lower(), name) for name in node.input]
        for value in model.graph.input:
            value.name = renames.get(value.name.lower(), value.name)
        for slot in self.layout.slots:
            default = self._stack(self.defaults[slot.name]).numpy()
            model.graph.initializer.append(onnx.numpy_helper.from_array(default, slot.name))
        for key, value in slots_metadata(self.layout).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(path))


def _peft_values(directory: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory's tensors under slot names, as the pass for its type converts them."""
    loader, config, weights = read_adapter_dir(directory)
    if not implements(loader, SlotValues):
        raise RewriteError(f"adapter {str(directory)!r} is a {loader.title} adapter, whose tensors fill no adapter "
                           "slots; export its graph with the adapter instead")
    return loader.slot_values(config, weights)


def adapter_values(source: str | Path) -> dict[str, torch.Tensor]:
    """Slot values from a PEFT-format adapter directory (ours or PEFT's) or a trained `.pt2` graph."""
    source = Path(source)
    if source.is_dir():
        return _peft_values(source)
    if source.suffix == ".pt2" and source.is_file():
        from rewrite.graph.archive import load

        return adapter_slots.values(load(source))
    raise RewriteError(f"adapter {str(source)!r} is neither an adapter directory (adapter_config.json + "
                       "adapter_model.safetensors) nor a .pt2 graph archive")


def export_adapter(source: str | Path, output: str | Path, model: str | Path) -> Path:
    """Converts an adapter to ONNX Runtime's format for `model`'s slots, checked before the file is written."""
    layout = SlotLayout.of_model(model)
    slots = layout.by_name()
    values = {name: value.detach().to(getattr(torch, slots[name].dtype)).numpy() if name in slots else value.numpy()
              for name, value in adapter_values(source).items()}
    check(values, layout, str(source))
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(layout.fingerprint)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in values.items()})
    output = Path(output)
    with atomic_path(output) as tmp:
        adapter.export_adapter(str(tmp))
    return output
