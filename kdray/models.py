"""Model registry: `create_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(1200, 1200))`.

Every model takes a flat float batch [B, D], D = prod(input_shape), and returns logits
[B, num_classes]. It exposes `body` (an nn.Module mapping [B, D] -> [B, F]) and `head` (the final
nn.Linear(F, num_classes)), and its forward computes `head(body(x))` through those attributes. That
contract is what lets the specialists stage start a specialist from the generalist's weights and
swap the head (`replace_head`); `create_model` checks it for user factories too.

`name` is either a registered name (`MODELS`) or an import path `package.module:factory`, called as
`factory(input_shape=..., num_classes=..., **kwargs)`.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {}


# ---------------------------------------------------------------------------------- registry
def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory `f(*, input_shape, num_classes, **options) -> nn.Module` to MODELS."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"model name must be a non-empty string without ':' (reserved for import paths), got {name!r}")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered (by {MODELS[name].__module__})")
        MODELS[name] = factory
        return factory

    return decorator


def create_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model `name` (registered, or `package.module:factory`) for flat inputs [B, D].

    Returns a module mapping [B, prod(input_shape)] -> logits [B, num_classes] with `body` and
    `head` attributes. Raises ValueError for an unknown name, a bad import path, a bad shape or a
    model breaking the contract; TypeError for keyword arguments the factory does not accept.
    """
    factory = _resolve_factory(name)
    input_shape = _validate_input_shape(input_shape)
    num_classes = _validate_int(num_classes, "num_classes", f"create_model({name!r})", minimum=1)
    _check_arguments(factory, name, {"input_shape": input_shape, "num_classes": num_classes, **kwargs})
    model = factory(input_shape=input_shape, num_classes=num_classes, **kwargs)
    try:
        check_model_contract(model, num_classes=num_classes)
    except ValueError as err:
        raise ValueError(f"create_model({name!r}): {err}") from None
    return model


def _resolve_factory(name: str) -> ModelFactory:
    """Look `name` up in MODELS, or import it when it is a `package.module:factory` path."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        return _import_factory(name)
    if "." in name:  # a dotted name is almost certainly an import path missing its colon
        raise ValueError(
            f"model {name!r} is not registered and is not an import path: write it as "
            f"'package.module:factory' (a colon before the factory name)"
        )
    raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}, or 'package.module:factory'")


def _import_factory(path: str) -> ModelFactory:
    """Import `package.module:attr[.attr...]` and return it if callable."""
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"model path {path!r} must look like 'package.module:factory'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:  # includes the module's own failing imports; say which
        raise ValueError(f"model path {path!r}: cannot import module {module_name!r} ({err})") from err
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"model path {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"model path {path!r}: {attr_path!r} is not callable (it is a {type(target).__name__})")
    return target


def _check_arguments(factory: ModelFactory, name: str, arguments: dict[str, Any]) -> None:
    """Raise TypeError naming any argument the factory would reject, before calling it."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some C-implemented callables have no signature; let the call decide
        return
    try:
        signature.bind(**arguments)
    except TypeError as err:
        accepted = [p for p in signature.parameters if p not in ("input_shape", "num_classes")]
        hints = [
            f"did you mean {match[0]!r} for {key!r}?"
            for key in arguments
            if key not in signature.parameters and (match := difflib.get_close_matches(key, accepted, n=1))
        ]
        message = f"create_model({name!r}): {err}"
        if hints:
            message += f"; {', '.join(hints)}"
        raise TypeError(f"{message}; {name!r} accepts: {', '.join(accepted) or 'no options'}") from None


# ---------------------------------------------------------------------------------- contract
def check_model_contract(model: Any, num_classes: int | None = None) -> None:
    """Raise ValueError unless `model` is an nn.Module with a `body` module and an nn.Linear `head`.

    With `num_classes`, also require `head.out_features == num_classes`. The forward pass itself
    is not run: that `forward` routes through `self.head` is part of the documented contract.
    """
    kind = type(model).__name__
    if not isinstance(model, nn.Module):
        raise ValueError(f"a model must be a torch.nn.Module, got {kind}")
    if not isinstance(getattr(model, "body", None), nn.Module):
        raise ValueError(f"model {kind} needs a 'body' attribute (nn.Module mapping [B, D] to features)")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        found = "missing" if head is None else type(head).__name__
        raise ValueError(f"model {kind} needs a 'head' attribute that is an nn.Linear (found: {found})")
    if num_classes is not None and head.out_features != num_classes:
        raise ValueError(f"model {kind}'s head has {head.out_features} outputs, expected num_classes={num_classes}")


def replace_head(model: nn.Module, num_outputs: int) -> nn.Module:
    """A deep copy of `model` whose head is a fresh nn.Linear(head.in_features, num_outputs).

    The body's weights are copied (the specialists start from the generalist); the new head has
    PyTorch's default nn.Linear initialisation (Kaiming-uniform weights, uniform bias in
    +-1/sqrt(in_features)), the same as a newly created model's head, on the old head's device
    and dtype. `model` itself is left unchanged.
    """
    check_model_contract(model)
    num_outputs = _validate_int(num_outputs, "num_outputs", "replace_head", minimum=1)
    old = model.head
    new_model = copy.deepcopy(model)
    new_model.head = nn.Linear(
        old.in_features, num_outputs, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    return new_model


def apply_max_norm(model: nn.Module, max_norm: float, include_head: bool = False) -> None:
    """Clamp, in place, the L2 norm of each unit's incoming weight vector to at most `max_norm`.

    The paper's weight constraint (from the dropout work): every row of every nn.Linear weight
    [out, in] is rescaled to norm <= max_norm; rows already within the bound are untouched. The
    head is skipped by default: the constraint regularises hidden units, and capping the head's
    rows would also cap the logit scale that temperature and bias corrections act on. Conv
    filters and biases are not constrained. Call after each optimizer step.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    skip = None if include_head else getattr(model, "head", None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not skip:
                # renorm_ rescales each slice along dim 0 (a row = one unit's fan-in) whose norm exceeds max_norm.
                module.weight.renorm_(2, 0, max_norm)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------- layers
class Classifier(nn.Module):
    """`head(body(x))` for flat inputs x [B, D]; the shape every kdray model has.

    Args:
        input_shape: the unflattened shape of one example, e.g. (784,) or (1, 28, 28).
        body: maps [B, D] -> [B, F], D = prod(input_shape).
        head: nn.Linear(F, num_classes) producing the logits [B, num_classes].
    """

    def __init__(self, input_shape: tuple[int, ...], body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.in_features = math.prod(self.input_shape)
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] -> logits [B, num_classes]."""
        _check_flat_input(x, self.in_features, self.input_shape)
        return self.head(self.body(x))


class JitterImages(nn.Module):
    """Translate each flat image by a random whole-pixel offset in [-jitter, jitter] per axis.

    Input and output are [B, C*H*W]. Training mode only (identity in eval): pixels shifted in are
    zeros, pixels shifted out are lost. One offset per example, shared by its channels. This is
    the paper's "inputs jittered by up to 2 pixels" for the big MNIST net.
    """

    def __init__(self, image_shape: tuple[int, int, int], jitter: int) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"jitter needs an image input_shape (C, H, W), got {tuple(image_shape)}")
        self.image_shape = tuple(image_shape)
        self.jitter = jitter

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, jitter={self.jitter}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C*H*W] -> [B, C*H*W], shifted per example when training."""
        _check_flat_input(x, math.prod(self.image_shape), self.image_shape)
        if not self.training or self.jitter == 0:
            return x
        return jitter_images(x, self.image_shape, self.jitter)


def jitter_images(x: torch.Tensor, image_shape: tuple[int, int, int], jitter: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat images x [B, C*H*W], each shifted by a random whole-pixel offset in [-jitter, jitter]
    per axis (offsets from `generator`, default torch's)."""
    size, device = (x.shape[0], 1, 1, 1), generator.device if generator is not None else x.device
    top = torch.randint(0, 2 * jitter + 1, size, generator=generator, device=device).to(x.device)
    left = torch.randint(0, 2 * jitter + 1, size, generator=generator, device=device).to(x.device)
    return shift_images(x, image_shape, jitter, top, left)


def shift_images(x: torch.Tensor, image_shape: tuple[int, int, int], jitter: int, top: torch.Tensor,
                 left: torch.Tensor) -> torch.Tensor:
    """Flat images x [B, C*H*W], example b shifted by jitter - top[b] rows and jitter - left[b]
    columns (top, left in [0, 2 * jitter]): pixels shifted in are zeros, pixels shifted out lost."""
    b, (c, h, w), j = x.shape[0], image_shape, jitter
    padded = F.pad(x.reshape(b, c, h, w), (j, j, j, j))
    # A crop starting at offset 0..2j of the zero-padded image is a shift by -j..j; gather all
    # crops at once with broadcast index tensors [B, C, H, W] instead of looping over examples.
    rows = top.reshape(b, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = left.reshape(b, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols].reshape(b, c * h * w)


def _check_flat_input(x: torch.Tensor, in_features: int, input_shape: tuple[int, ...]) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"expected a flat input [B, {in_features}] (input_shape {input_shape} flattened), got {tuple(x.shape)}"
        )


# ---------------------------------------------------------------------------------- models
@register_model("mlp")
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (800, 800),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    jitter: int = 0,
) -> Classifier:
    """The paper's MNIST nets: ReLU hidden layers of widths `hidden`, then a linear head.

    Defaults are the small net (2 x 800, no regularisation); the big net is hidden=(1200, 1200),
    dropout=0.5, input_dropout=0.2, jitter=2 (+ max-norm in training). hidden=() is logistic
    regression. `dropout` follows each hidden ReLU; `jitter` (training only) needs a (C, H, W)
    input_shape. Submodules are named (body.linear1, ...) so checkpoints load whether or not the
    regularisers are switched on.
    """
    where = "model 'mlp'"
    widths = _validate_widths(hidden, "hidden", where)
    dropout = _validate_probability(dropout, "dropout", where)
    input_dropout = _validate_probability(input_dropout, "input_dropout", where)
    layers = _input_layers(input_shape, jitter, where)
    if input_dropout > 0:
        layers["input_dropout"] = nn.Dropout(input_dropout)
    features = math.prod(input_shape)
    for i, width in enumerate(widths, start=1):
        layers[f"linear{i}"] = nn.Linear(features, width)
        layers[f"relu{i}"] = nn.ReLU()
        if dropout > 0:
            layers[f"dropout{i}"] = nn.Dropout(dropout)
        features = width
    return Classifier(input_shape, nn.Sequential(layers), nn.Linear(features, num_classes))


@register_model("cnn")
def cnn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
    jitter: int = 0,
) -> Classifier:
    """A small conv net for (C, H, W) images: per entry of `channels` a 3x3 conv (same padding),
    ReLU and 2x2 max-pool; then Linear(-> hidden), ReLU, dropout, and the linear head.

    The default channels=(32, 64) gives the two blocks; each block halves H and W (floor), so
    H and W must be at least 2 ** len(channels). Regularisation is off by default, like "mlp".
    """
    where = "model 'cnn'"
    if len(input_shape) != 3:
        raise ValueError(f"{where} needs an image input_shape (C, H, W), got {input_shape}")
    widths = _validate_widths(channels, "channels", where)
    if not widths:
        raise ValueError(f"{where}: channels must name at least one conv block")
    hidden = _validate_int(hidden, "hidden", where, minimum=1)
    dropout = _validate_probability(dropout, "dropout", where)
    c, h, w = input_shape
    if min(h, w) < 2 ** len(widths):
        raise ValueError(f"{where}: {len(widths)} pooling blocks need H, W >= {2 ** len(widths)}, got {input_shape}")
    layers = _input_layers(input_shape, jitter, where)
    layers["unflatten"] = nn.Unflatten(1, input_shape)
    for i, width in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, width, kernel_size=3, padding=1)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c, h, w = width, h // 2, w // 2
    layers["flatten"] = nn.Flatten()
    layers["linear"] = nn.Linear(c * h * w, hidden)
    layers["relu"] = nn.ReLU()
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    return Classifier(input_shape, nn.Sequential(layers), nn.Linear(hidden, num_classes))


def _input_layers(input_shape: tuple[int, ...], jitter: int, where: str) -> OrderedDict[str, nn.Module]:
    """The body's leading layers: the jitter augmentation when asked for."""
    jitter = _validate_int(jitter, "jitter", where, minimum=0)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if jitter > 0:
        if len(input_shape) != 3:
            raise ValueError(f"{where}: jitter={jitter} needs an image input_shape (C, H, W), got {input_shape}")
        layers["jitter"] = JitterImages(input_shape, jitter)
    return layers


# ---------------------------------------------------------------------------------- validation
def _validate_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Accept any non-empty sequence of positive ints (YAML gives lists); return a tuple."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape:
        raise ValueError(f"input_shape must be a non-empty sequence like (784,) or (1, 28, 28), got {input_shape!r}")
    return tuple(_validate_int(d, f"input_shape[{i}]", "create_model", minimum=1) for i, d in enumerate(input_shape))


def _validate_int(value: Any, name: str, where: str, minimum: int) -> int:
    """Return `value` as an int (numpy ints welcome, bools and floats not) if it is >= minimum."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return number


def _validate_probability(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{where}: {name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def _validate_widths(values: Any, name: str, where: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{where}: {name} must be a sequence of positive ints, got {values!r}")
    return tuple(_validate_int(v, f"{name}[{i}]", where, minimum=1) for i, v in enumerate(values))
