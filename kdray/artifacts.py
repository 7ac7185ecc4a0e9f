"""Model bundles: a trained model's weights plus the spec needed to rebuild it.

A bundle directory holds ``model.pt`` (a plain state dict: loadable with ``weights_only=True``, so
no pickled code runs on load) and ``model.json`` (registry name, options, input shape, number of
outputs, and any per-class logit bias fitted afterwards); ``model.pt2`` is an optional export. Stages hand models to each other only as
bundles on storage.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kdray.models import create_model
from kdray.storage import Storage

WEIGHTS = "model.pt"
SPEC = "model.json"
EXPORTED = "model.pt2"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict[str, Any]
    input_shape: tuple[int, ...]
    num_outputs: int
    logit_bias: tuple[float, ...] | None = None  # added to the logits at inference (bias correction)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a specialist's class subset

    def build(self) -> nn.Module:
        model = create_model(self.name, self.input_shape, self.num_outputs, **self.options)
        return BiasedLogits(model, self.logit_bias) if self.logit_bias is not None else model

    def with_bias(self, bias: list[float] | tuple[float, ...] | None) -> ModelSpec:
        return replace(self, logit_bias=None if bias is None else tuple(float(b) for b in bias))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ModelSpec:
        value = dict(value)
        value["input_shape"] = tuple(value["input_shape"])
        if value.get("logit_bias") is not None:
            value["logit_bias"] = tuple(value["logit_bias"])
        return cls(**value)


class BiasedLogits(nn.Module):
    """A model whose logits get a fixed per-class bias: the paper's correction for omitted classes."""

    def __init__(self, model: nn.Module, bias: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.bias


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def save_bundle(storage: Storage, directory: str, spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> None:
    buffer = io.BytesIO()
    torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, buffer)
    storage.write_bytes(buffer.getvalue(), directory, WEIGHTS)
    storage.write_json(spec.to_json(), directory, SPEC)  # last: a bundle with a spec is complete


def load_spec(storage: Storage, directory: str) -> ModelSpec:
    return ModelSpec.from_json(storage.read_json(directory, SPEC))


def load_bundle(storage: Storage, directory: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a bundle's model in eval mode (bias correction applied when the spec has one)."""
    spec = load_spec(storage, directory)
    state = torch.load(io.BytesIO(storage.read_bytes(directory, WEIGHTS)), map_location=device, weights_only=True)
    model = create_model(spec.name, spec.input_shape, spec.num_outputs, **spec.options)
    model.load_state_dict(state)
    if spec.logit_bias is not None:
        model = BiasedLogits(model, spec.logit_bias)
    return model.to(device).eval(), spec


def export_program(storage: Storage, directory: str, model: nn.Module, spec: ModelSpec) -> str:
    """`model.pt2`: a `torch.export` program (TorchScript's successor; `torch.jit` is deprecated in
    torch 2.13) that runs without kdray: `torch.export.load(path).module()(x)` with x [B, D]."""
    example = torch.zeros(2, math.prod(spec.input_shape))
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    storage.write_bytes(buffer.getvalue(), directory, EXPORTED)
    return EXPORTED
