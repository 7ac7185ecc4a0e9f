"""Model bundles: a trained model's weights plus the spec needed to rebuild it.

A bundle directory holds ``model.pt`` (a plain state dict: loadable with ``weights_only=True``, so
no pickled code runs on load) and ``model.json`` (registry name, options, input shape, number of
outputs, and any per-class logit bias fitted afterwards); ``model.pt2`` is an optional export. Stages hand models to each other only as
bundles on storage.

A bundle is a file on disk, so it names no code by itself: a spec naming a `package.module:factory`
loads only when that path is in the `trusted` paths the caller passes (those the user's own config
names, or every path with `--trust-code`), never because `model.json` says so.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any

import pyarrow.fs as pafs
import pydantic
import torch
from torch import nn

from kdray.models import create_model
from kdray.runtime.storage import Storage

WEIGHTS = "model.pt"
SPEC = "model.json"
EXPORTED = "model.pt2"


class BundleError(Exception):
    """A model bundle cannot be loaded: missing or damaged files, or a factory nobody trusted."""


_Positive = Annotated[int, pydantic.Field(gt=0)]
_Finite = Annotated[float, pydantic.Field(allow_inf_nan=False)]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict[str, Any]
    input_shape: tuple[_Positive, ...]
    num_outputs: _Positive
    logit_bias: tuple[_Finite, ...] | None = None  # added to the logits at inference (bias correction)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a specialist's class subset

    def build(self) -> nn.Module:
        model = create_model(self.name, self.input_shape, self.num_outputs, **self.options)
        return BiasedLogits(model, self.logit_bias) if self.logit_bias is not None else model

    def with_bias(self, bias: list[float] | tuple[float, ...] | None) -> ModelSpec:
        return replace(self, logit_bias=None if bias is None else tuple(float(b) for b in bias))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any, where: str = "model.json") -> ModelSpec:
        """A spec from its JSON form; BundleError naming `where` and the field if it is malformed."""
        try:
            spec = _SPEC_ADAPTER.validate_python(value)
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            field_name = ".".join(str(part) for part in problem["loc"]) or "<root>"
            raise BundleError(f"{where}: {field_name}: {problem['msg']}") from None
        if spec.logit_bias is not None and len(spec.logit_bias) != spec.num_outputs:
            raise BundleError(f"{where}: logit_bias has {len(spec.logit_bias)} values for {spec.num_outputs} outputs")
        return spec


_SPEC_ADAPTER = pydantic.TypeAdapter(ModelSpec)


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: one bundle directory, or several (an ensemble), on one storage root;
    `trusted` lists the `package.module:factory` paths its bundles may name (see kdray.runtime.artifacts)."""

    location: str
    bundles: tuple[str, ...]
    trusted: tuple[str, ...] = ()


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
    """A bundle's spec, checked: BundleError naming the file if it is missing or malformed. (A spec
    runs nothing; building its model is what `trusted` guards.)"""
    where = storage.uri(directory, SPEC)
    try:
        value = storage.read_json(directory, SPEC)
    except FileNotFoundError:
        raise BundleError(f"{where} not found: not a model bundle (or an unfinished one)") from None
    except ValueError as error:  # also UnicodeDecodeError
        raise BundleError(f"{where}: not valid JSON ({error})") from None
    return ModelSpec.from_json(value, where)


def load_bundle(storage: Storage, directory: str, device: str | torch.device = "cpu",
                trusted: Sequence[str] = ()) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a bundle's model in eval mode (bias correction applied when the spec has one).
    BundleError naming the file when the spec or the weights cannot be used (see `load_spec`)."""
    spec = load_spec(storage, directory)
    model = _build(spec, storage.uri(directory, SPEC), trusted)
    _load_weights(model, storage, directory, device)
    if spec.logit_bias is not None:
        model = BiasedLogits(model, spec.logit_bias)
    return model.to(device).eval(), spec


def check_bundle(storage: Storage, directory: str, trusted: Sequence[str] = ()) -> ModelSpec:
    """What `load_bundle` would refuse, found without building the model in memory (it is built
    on the meta device; local weights are memory-mapped): for a driver to check every bundle of a
    run before it starts the workers that load them."""
    spec = load_spec(storage, directory)
    with torch.device("meta"):
        model = _build(spec, storage.uri(directory, SPEC), trusted)
    _load_weights(model, storage, directory, "cpu", assign=True)
    return spec


def _build(spec: ModelSpec, where: str, trusted: Sequence[str]) -> nn.Module:
    if ":" in spec.name and spec.name not in trusted:
        raise BundleError(f"{where} names the model factory {spec.name!r}, which would import and run code; "
                          f"kdray runs it only when you ask: pass --trust-code if you trust this run's files")
    try:
        return create_model(spec.name, spec.input_shape, spec.num_outputs, **spec.options)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{where}: {error}") from None


def _load_weights(model: nn.Module, storage: Storage, directory: str, device: str | torch.device,
                  assign: bool = False) -> None:
    state = _read_weights(storage, directory, device, mmap=assign)
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise BundleError(f"{storage.uri(directory, WEIGHTS)} does not fit the model its {SPEC} describes: "
                          f"{_first_line(error)}") from None


def _read_weights(storage: Storage, directory: str, device: str | torch.device,
                  mmap: bool = False) -> dict[str, torch.Tensor]:
    where = storage.uri(directory, WEIGHTS)
    if not storage.exists(directory, WEIGHTS):
        raise BundleError(f"{where} not found")
    local = mmap and isinstance(storage.filesystem, pafs.LocalFileSystem)
    source = storage.path(directory, WEIGHTS) if local else io.BytesIO(storage.read_bytes(directory, WEIGHTS))
    try:
        state = torch.load(source, map_location=device, weights_only=True, mmap=local)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise BundleError(f"{where} is not a weights file kdray can load safely: {_first_line(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise BundleError(f"{where} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _first_line(error: BaseException, limit: int = 160) -> str:
    """A library error's gist for a one-line message (torch's run to paragraphs)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def export_program(storage: Storage, directory: str, model: nn.Module, spec: ModelSpec) -> str:
    """`model.pt2`: a `torch.export` program (TorchScript's successor; `torch.jit` is deprecated in
    torch 2.13) that runs without kdray: `torch.export.load(path).module()(x)` with x [B, D]."""
    example = torch.zeros(2, math.prod(spec.input_shape))
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    storage.write_bytes(buffer.getvalue(), directory, EXPORTED)
    return EXPORTED
