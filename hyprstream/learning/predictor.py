"""The model in torch eager mode: the agent's fallback engine and the reference its ONNX paths are checked
against, and what the fog's offload endpoint serves."""

from __future__ import annotations

import numpy as np

from hyprstream.learning.trainer import load_weights
from hyprstream.telemetry.records import ExecutionProvider, ModelVariant

__all__ = ["TorchPredictor"]


class TorchPredictor:
    """The model in torch eager mode (the fallback, and the reference the ONNX paths are checked against)."""

    backend = "torch"
    variant = ModelVariant.FP32

    def __init__(self, task, weights: dict[str, np.ndarray] | None = None, *, model=None, device: str = "cpu") -> None:
        import torch

        if model is None:
            model = task.build_model(seed=0)
            if weights is not None:
                load_weights(model, weights)
        self._torch = torch
        self.model = model.eval().to(device)
        self.device = device
        self.provider = ExecutionProvider.CUDA if device.startswith("cuda") else ExecutionProvider.CPU

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.as_tensor(x, device=self.device)).float().cpu().numpy()
