"""A network as an ONNX graph with its state as inputs and outputs, scored by ONNX Runtime with the
state fed back, and quantised to int8 by ONNX Runtime (docs/export.md, "ONNX").

    inputs   ids (batch, time) int64, then state.<layer>.<i>: the network's state flattened, layer by
             layer, each tensor with the batch in dimension 1
    outputs  log_probs (batch, time, vocab) float32, then state.<layer>.<i>.out: the state after the
             last step, which the metadata's "state_feedback" maps to the input it feeds

ONNX Runtime keeps no state between runs, so the caller carries it, as speech recognisers' stateful
LM scorers do. A sequence starts from zeros of the shapes in the metadata's "state_shapes", after the
token "start_token" (<eos>).
"""

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lm.data.text import EOS
from lm.errors import UserError
from lm.evaluation.model_folder import TrainedModel
from lm.models.network import Network, State

EXTRA = 'pip install -e ".[export]"'


def require(name: str) -> ModuleType:
    """An [export] extra's package, or one line naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        packages = "onnx, onnxscript and onnxruntime"
        raise UserError(f"ONNX export needs {packages} ({name} is missing): {EXTRA}") from None


class StatefulGraph(nn.Module):
    """The network as the graph sees it: ids and the flattened state in, log-probabilities and the
    flattened new state out (torch.export takes tensors, not the contract's list of tuples)."""

    def __init__(self, net: Network, structure: list[int]):
        super().__init__()
        self.net, self.structure = net, structure  # structure: the number of tensors of each layer

    def forward(self, ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = iter(state)
        nested = [tuple(next(tensors) for _ in range(count)) for count in self.structure]
        features, new_state = self.net.features(ids, nested)
        log_probs = F.log_softmax(self.net.logits(features).float(), dim=-1)
        return (log_probs, *flatten(new_state))


def flatten(state: State) -> list[torch.Tensor]:
    return [tensor for layer in state for tensor in layer]


def onnx_model(model: TrainedModel, network: str) -> Any:
    """The ONNX ModelProto of a model's network, or one UserError saying why it cannot be one.
    `network` names it in errors (model.net's choice: lstm, mogrifier, xlstm)."""
    require("onnxscript")
    onnx = require("onnx")
    net = model.net.eval()
    ids = torch.randint(len(model.vocabulary), (2, 3))
    with torch.no_grad():
        _, probe = net.features(ids)
        zeros = [torch.zeros_like(tensor) for tensor in flatten(probe)]
        structure = [len(layer) for layer in probe]
        graph = StatefulGraph(net, structure)
        from_none = F.log_softmax(net.logits(net.features(ids)[0]).float(), -1)
        if not torch.equal(graph(ids, *zeros)[0], from_none):
            raise UserError(
                f"model.net={network} cannot be exported to ONNX: its empty state is not zeros, which "
                "is what the graph's users start a sequence from."
            )
    names = [f"state.{layer}.{i}" for layer, count in enumerate(structure) for i in range(count)]
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    try:
        program = torch.onnx.export(
            graph,
            (ids, *zeros),
            dynamo=True,
            input_names=["ids", *names],
            output_names=["log_probs", *[f"{name}.out" for name in names]],
            dynamic_shapes=({0: batch, 1: time}, tuple({1: batch} for _ in names)),
        )
    except Exception as error:  # torch.export's account is pages long: its first line, the rest logged
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UserError(
            f"model.net={network} cannot be exported to ONNX: torch.onnx.export failed "
            f"({type(error).__name__}: {first})."
        ) from None
    proto = program.model_proto
    ids_dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not ids_dims[1].dim_param:
        raise UserError(
            f"model.net={network} cannot be exported to ONNX with a dynamic time axis: its cell steps "
            "through time in a Python loop, which torch.export unrolls to one length. model.net=lstm "
            "exports (nn.LSTM becomes ONNX's LSTM operator)."
        )
    # The exporter leaves the LSTM's outputs, and the log-probabilities, at the example's length in
    # the shapes it annotates: ONNX Runtime would warn at every call of another length. The outputs
    # get the input's time axis; the intermediate annotations, optional, go (Runtime infers its own).
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = ids_dims[1].dim_param
    del proto.graph.value_info[:]
    shapes = {
        name: ["batch" if dim == 1 else size for dim, size in enumerate(tensor.shape)]
        for name, tensor in zip(names, zeros, strict=True)
    }
    metadata = {
        "state_feedback": json.dumps({f"{name}.out": name for name in names}),
        "state_shapes": json.dumps(shapes),
        "initial_state": "zeros",
        "start_token": EOS,
        "start_token_id": str(model.vocabulary.index[EOS]),
        "vocab_size": str(len(model.vocabulary)),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto


def write_onnx(proto: Any, path: Path) -> None:
    require("onnx").save(proto, str(path))


def quantize(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights, activations quantised on the fly (torch's
    quantize_dynamic is being removed from torch). Runtime's pre-processing comes first: its constant
    folding makes the LSTM's weights (gathered from torch's by Slice and Concat) and the tied
    softmax's (a Transpose of the embedding) constants, which only then are quantised, as
    DynamicQuantizeLSTM and MatMulInteger."""
    quantization = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folded = target.with_name(target.name + ".folded")
    try:
        quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
        quantization.quantize_dynamic(str(folded), str(target), weight_type=quantization.QuantType.QInt8)
    finally:
        folded.unlink(missing_ok=True)


class OnnxScorer:
    """An ONNX Runtime session of model.onnx (or model.int8.onnx) that scores a stream in windows,
    feeding each window's state outputs back as the next window's inputs."""

    def __init__(self, path: Path):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many as the eager model uses
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.feedback: dict[str, str] = json.loads(metadata["state_feedback"])
        self.shapes: dict[str, list] = json.loads(metadata["state_shapes"])
        self.outputs = [output.name for output in self.session.get_outputs()]

    def empty_state(self, batch: int) -> dict[str, np.ndarray]:
        return {
            name: np.zeros([batch if size == "batch" else size for size in shape], np.float32)
            for name, shape in self.shapes.items()
        }

    def run(self, ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """log-probabilities (batch, time, vocab) of ids (batch, time) after `state`, and the state
        after them, named as the inputs it feeds."""
        outputs = dict(zip(self.outputs, self.session.run(None, {"ids": ids, **state}), strict=True))
        state = {self.feedback[name]: value for name, value in outputs.items() if name in self.feedback}
        return outputs["log_probs"], state

    def log_probs(self, ids: torch.Tensor, window: int = 35) -> torch.Tensor:
        """log p(ids[t + 1] | ids[:t + 1]) for every target of one stream (batch 1), float64. The
        loop runs no torch op: torch's idle OpenMP threads would spin against Runtime's for the cores
        (that halved Runtime's speed on 2 cores)."""
        stream, state, scores = ids.numpy(), self.empty_state(1), []
        for start in range(0, len(stream) - 1, window):
            targets = stream[start + 1 : start + window + 1]
            log_probs, state = self.run(stream[None, start : start + len(targets)], state)
            scores.append(np.take_along_axis(log_probs[0], targets[:, None], axis=1)[:, 0])
        return torch.from_numpy(np.concatenate(scores)).double()
