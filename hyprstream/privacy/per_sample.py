"""Per-example clipped gradient sums of trainable ``nn.Linear`` layers, without per-example gradients.

DP-SGD needs ``sum_i c_i g_i`` where ``g_i`` is example i's gradient over all trained parameters
and ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus' clip factor). For a linear layer ``y = a W^T + b``
example i's gradients are ``dW_i = sum_t e_it a_it^T`` and ``db_i = sum_t e_it`` (``e = dL_i/dy``,
``t`` over any positions between the batch and feature dimensions, and over repeated calls of the
layer). Their squared norms follow from small products, never from the ``B x out x in`` tensor
Opacus materialises:

* one position (``(B, features)`` inputs, the usual case): ``||dW_i||^2 = ||e_i||^2 ||a_i||^2``;
* several: ``||dW_i||^2 = sum_{t,s} (e_it . e_is)(a_it . a_is)`` (the Gram-matrix identity that
  Opacus' ghost clipping also uses),

and the clipped sum is one matrix product: ``sum_i c_i dW_i = (c * e)^T a``. The values are those of
Opacus' ``GradSampleModule`` + ``DPOptimizer.clip_and_accumulate`` up to float rounding (checked
against both, and against a per-example loop, in ``tests/privacy/test_per_sample.py``); the
mechanism -- the clip bound, the clip factor, the noise and the sampling around it -- is unchanged.

:meth:`LinearClipper.supports` says whether a model qualifies: every module that owns a trainable
parameter is an ``nn.Linear`` whose parameters are all trainable. Anything else (convolutions,
embeddings, normalisation layers with trainable affine parameters) goes through Opacus.
"""

from __future__ import annotations

import math


def _trained_modules(model):
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


class LinearClipper:
    """Records the inputs and outputs of a model's trained linear layers on each forward pass."""

    def __init__(self, model) -> None:
        if not self.supports(model):
            raise ValueError("per-example clipping without Opacus needs every trained module to be an "
                             "nn.Linear with all of its parameters trained")
        self.modules = _trained_modules(model)
        self._calls: dict[int, list] = {id(m): [] for m in self.modules}
        self._handles = [m.register_forward_hook(self._record) for m in self.modules]

    @staticmethod
    def supports(model) -> bool:
        from torch import nn

        modules = _trained_modules(model)
        return bool(modules) and all(
            type(m) is nn.Linear and all(p.requires_grad for p in m.parameters(recurse=False)) for m in modules)

    def _record(self, module, inputs, output) -> None:
        self._calls[id(module)].append((inputs[0].detach(), output))

    def reset(self) -> None:
        for calls in self._calls.values():
            calls.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()

    def parameters(self) -> list:
        """The trained parameters, in the order :meth:`clipped_sum` returns their sums."""
        return [p for m in self.modules for p in m.parameters(recurse=False)]

    def clipped_sum(self, loss, batch_size: int, max_grad_norm: float, *, mean_loss: bool = True) -> list:
        """``sum_i c_i g_i`` per trained parameter (the order of :meth:`parameters`) for the last forward pass.

        ``loss`` is the batch's loss from that pass; with ``mean_loss`` it is a mean over the
        ``batch_size`` examples and each example's gradient is that of its own loss (Opacus'
        ``loss_reduction="mean"``: backprops scaled by the batch size).
        """
        import torch

        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
        calls = [self._calls[id(m)] for m in self.modules]
        if any(not c for c in calls):
            raise ValueError("a trained layer took no part in the last forward pass")
        outputs = [out for c in calls for _, out in c]
        grads = torch.autograd.grad(loss, outputs)
        # each example's own-loss gradient is scale * e; the scale is folded into the clip factor
        scale = float(batch_size) if mean_loss else 1.0
        if all(len(c) == 1 and c[0][0].dim() == 2 for c in calls):
            per_module = [(m, c[0][0], g) for m, c, g in zip(self.modules, calls, grads, strict=True)]
            sq = None
            for m, a, e in per_module:
                e_sq = (e * e).sum(dim=1)
                term = e_sq * (a * a).sum(dim=1)
                if m.bias is not None:
                    term += e_sq
                sq = term if sq is None else sq.add_(term)
        else:
            per_module, sq, pos = [], None, 0
            for m, c in zip(self.modules, calls, strict=True):
                acts, errs = [], []
                for a, _ in c:
                    e = grads[pos]
                    pos += 1
                    acts.append(a.reshape(a.shape[0], -1, a.shape[-1]))
                    errs.append(e.reshape(e.shape[0], -1, e.shape[-1]))
                a = torch.cat(acts, dim=1)
                e = torch.cat(errs, dim=1)
                term = ((e @ e.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
                if m.bias is not None:
                    s = e.sum(dim=1)
                    term += (s * s).sum(dim=1)
                sq = term if sq is None else sq.add_(term)
                per_module.append((m, a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])))
        # Opacus: c_i = min(1, C / (||g_i|| + 1e-6)) with ||g_i|| = scale * sqrt(sq_i); weights scale * c_i
        norms = sq.sqrt_().mul_(scale)
        weight = norms.add_(1e-6).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0).mul_(scale)
        out = []
        for m, a, e in per_module:
            w = weight if e.shape[0] == weight.shape[0] else weight.repeat_interleave(e.shape[0] // weight.shape[0])
            ce = e * w[:, None]
            out.append(ce.t() @ a)
            if m.bias is not None:
                out.append(ce.sum(dim=0))
        self.reset()
        return out


__all__ = ["LinearClipper"]
