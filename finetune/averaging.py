"""An exponential moving average of the weights a later stage trains (the tail, fine-tuning).

These stages start from a trained model, and their first epoch, at the top of the learning
rate, used to dip below it on val (textures: the tail's first epoch 0.9750 -> 0.9500, every
later epoch back at 0.9750-0.9792) before the decaying rate brought it back: the noise of
single steps, not where training goes. The average of the last half-epoch of steps follows
where training goes without that noise, so the stages validate and keep it, and train on the
weights as they are (BENCHMARKS.md, "Averaged weights": with it the textures' tail epochs read
0.9750 throughout and chest X-rays keep their gain from the tail).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The average of `named` parameters over about `steps` optimizer steps (its time constant),
    starting from their values now."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], steps: float):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.rate = 1.0 / max(1.0, steps)  # each step moves the average this part of the way to the weights
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], self.rate)

    @contextmanager
    def in_model(self) -> Iterator[None]:
        """The averaged weights in the model (to validate and keep), then the trained ones back."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The average a resumed stage goes on from; a state saved before averaging existed has
        none (the average then starts from the weights the stage resumes with)."""
        with torch.no_grad():
            for name, a in zip(self.names, self.average):
                if name in state:
                    a.copy_(state[name])


def named_in(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """`params` with their names in `model`, in the given order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for p in params]
