"""A thin layer over onnx.helper: nodes, inputs/outputs, small inline constants, and checkpoint
weights streamed into one external-data file as they are converted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.checkpoint import Checkpoint

OPSET = 18
# Page-aligned offsets let onnxruntime memory-map each weight straight from the file.
ALIGN = 4096


class WeightsFile:
    """The single external-data file: tensors are appended one by one, never all held at once."""

    def __init__(self, path: Path, on_write: Callable[[int], None] | None = None):
        """`on_write(nbytes)` is called after each tensor is written (export progress)."""
        self.path = path
        self._file = path.open("wb")
        self._offset = 0
        self._on_write = on_write

    def append(self, array: np.ndarray) -> tuple[int, int]:
        """Write `array`'s bytes at the next aligned offset; return (offset, length)."""
        padding = -self._offset % ALIGN
        self._file.write(b"\0" * padding)
        self._offset += padding
        offset = self._offset
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._offset += array.nbytes
        if self._on_write is not None:
            self._on_write(array.nbytes)
        return offset, array.nbytes

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def convert(array: np.ndarray, dtype: np.dtype, transpose: bool = False) -> np.ndarray:
    """Cast (and transpose) in one pass over the data; no copy when nothing changes."""
    source = array.T if transpose else array
    if source.dtype == dtype and source.flags.c_contiguous:
        return source
    out = np.empty(source.shape, dtype)
    np.copyto(out, source, casting="unsafe")
    return out


class GraphBuilder:
    """Collects nodes and tensors of one graph. `dtype` is the compute dtype of activations and
    weights (float32 or float16); ops that must stay in float32 say so themselves."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        weights: WeightsFile,
        dtype: np.dtype,
        on_param: Callable[[], None] | None = None,
    ):
        """`on_param()` is called after each checkpoint tensor is converted (export progress)."""
        self.checkpoint = checkpoint
        self._on_param = on_param
        self.weights = weights
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._constants: dict[tuple, str] = {}
        self._names: set[str] = set()

    @property
    def onnx_dtype(self) -> int:
        return helper.np_dtype_to_tensor_dtype(self.dtype)

    def _unique(self, name: str) -> str:
        candidate, n = name, 0
        while candidate in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate)
        return candidate

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def node(
        self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs
    ) -> str:
        """Add one node; returns its (first) output name, `<name>/out` unless given."""
        name = self._unique(name)
        outputs = outputs or [f"{name}/out"]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shape, axes, scalar), stored inline and shared by value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self._unique(f"const/{array.dtype.name}/{len(self._constants)}")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def has_param(self, name: str) -> bool:
        return name in self.checkpoint

    def param(self, name: str, dtype: np.dtype | None = None, transpose: bool = False) -> str:
        """A checkpoint tensor, converted to `dtype` (default the graph's) and streamed to the
        external-data file. The initializer keeps the checkpoint's name."""
        array = convert(self.checkpoint.tensor(name), np.dtype(dtype or self.dtype), transpose)
        name = self.external(name, array)
        if self._on_param is not None:
            self._on_param()
        return name

    def external(self, name: str, array: np.ndarray) -> str:
        """An initializer computed at export time (a quantized weight, a RoPE table), streamed to
        the external-data file like a checkpoint tensor."""
        offset, length = self.weights.append(array)
        tensor = TensorProto(
            name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.weights.path.name),
            ("offset", offset),
            ("length", length),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
        self._names.add(name)
        return name

    def model(self, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs, self.outputs, self.initializers
        )
        # onnxruntime's contrib ops (fused targets) live in the com.microsoft domain, version 1.
        domains = sorted({n.domain for n in self.nodes} - {"", "ai.onnx"})
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="fermi")
        # onnxruntime 1.20 (our floor) reads IR version 10 models.
        model.ir_version = 10
        return model
