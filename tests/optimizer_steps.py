"""The training steps the low-rank optimizer parity tests (GaLore/Fira against the official packages, APOLLO against
apollo-torch) run on both sides: the same seeded batches and one loss spike, so a refresh after it is exercised."""

from __future__ import annotations

import torch

#: the step whose loss is scaled ×20 (Fira's norm-growth limiter and the projections see a sudden large gradient)
SPIKE = 12


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(1000 + step))


def train(model, optimizer, steps) -> None:
    for step in steps:
        x = batch(step)
        labels = x if model.config.model_type == "llama" else x[:, 0] % 3
        loss = model(input_ids=x, labels=labels).loss * (20.0 if step == SPIKE else 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
