"""One optimisation step: forward through every deep-supervision head, loss, backward, update.

With ``amp`` the forward runs under autocast (the Mamba layers force float32 themselves): float16
with a gradient scaler on CUDA, as nnU-Net does, bfloat16 on CPUs with native support (no scaler
needed: bfloat16 has float32's range); gradients are unscaled before the norm is clipped. A non-finite loss stops the run instead of corrupting weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backend.errors import InvalidInput
from backend.model.device import autocast
from backend.model.schedule import set_lr


def all_heads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Deep-supervision outputs, full resolution first (a network without extra heads gives one)."""
    heads = getattr(model, "forward_deep_supervision", None)
    outputs: list[torch.Tensor] = heads(x) if heads is not None else [model(x)]
    return outputs


class OptimisationStep:
    """``step(x, y, lr) -> (loss, full-resolution logits)``; owns the optimiser and grad scaler."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp: bool,
        grad_clip: float,
        deep_supervision: bool,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = device
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
        self.grad_clip = grad_clip
        self.deep_supervision = deep_supervision
        self.count = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, torch.Tensor]:
        set_lr(self.optimizer, lr)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            if self.deep_supervision:
                outputs = all_heads(self.model, x)
                loss = self.loss_fn(outputs, y)
                top = outputs[0]
            else:
                top = self.model(x)
                loss = self.loss_fn(top, y)
        if not torch.isfinite(loss):
            raise InvalidInput(f"training diverged at step {self.count} (loss {loss.item()}); lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.count += 1
        return float(loss.detach()), top.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
