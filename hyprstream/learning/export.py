"""A task's torch model as ONNX (fp32), for ONNX Runtime: one input ``input`` and one output ``output``,
both with a dynamic batch dimension (``torch.onnx.export``, the TorchScript exporter, opset 17).

Shared by the agent (which also makes an int8 variant, :mod:`hyprstream.agent.export`) and by
``hyprstream core pull --onnx`` (a committed version as a file an inference service can load).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["INPUT", "OPSET", "OUTPUT", "export_onnx"]

OPSET = 17
INPUT, OUTPUT = "input", "output"


def export_onnx(task, model, path: Path) -> Path:
    """Write ``model`` (a torch module of ``task``) as ONNX with a dynamic batch dimension."""
    import warnings

    import torch

    model = model.eval().cpu()
    example = torch.as_tensor(task.example_input(2))
    # the TorchScript exporter on purpose: the torch.export one needs onnxscript, which is not a
    # dependency; its deprecation and tracer warnings say nothing about this export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return path
