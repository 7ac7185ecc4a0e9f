"""Tests for kdray.models: every registered model, the mlp/cnn options, and the registry's errors."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from torch import nn

from kdray import models
from kdray.models import (
    MODELS,
    JitterImages,
    apply_max_norm,
    check_model_contract,
    count_parameters,
    create_model,
    register_model,
    replace_head,
)

IMAGE_SHAPE = (1, 8, 8)  # small enough to be fast, big enough for the cnn's two pooling blocks
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _batch(shape: tuple[int, ...] = IMAGE_SHAPE, size: int = 16) -> torch.Tensor:
    return torch.randn(size, math.prod(shape))


# ------------------------------------------------------------------------ every registered model
@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    return create_model(request.param, IMAGE_SHAPE, NUM_CLASSES)


def test_output_is_logits_per_class(model: nn.Module) -> None:
    out = model(_batch())
    assert out.shape == (16, NUM_CLASSES)
    assert out.dtype == torch.float32


def test_exposes_body_and_linear_head(model: nn.Module) -> None:
    assert isinstance(model.body, nn.Module)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == NUM_CLASSES
    x = _batch()
    torch.testing.assert_close(model.head(model.body(x)), model(x))  # forward goes through body and head


def test_gradients_reach_every_parameter(model: nn.Module) -> None:
    loss = nn.functional.cross_entropy(model(_batch()), torch.randint(0, NUM_CLASSES, (16,)))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_eval_is_deterministic(model: nn.Module) -> None:
    model.eval()
    x = _batch()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_rejects_input_of_the_wrong_width(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"expected a flat input \[B, 64\]"):
        model(torch.randn(2, 63))


def test_replace_head_keeps_body_and_leaves_original(model: nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = replace_head(model, 3)
    assert swapped.head.out_features == 3 and swapped.head.in_features == model.head.in_features
    assert swapped(_batch()).shape == (16, 3)
    for key, value in model.body.state_dict().items():
        torch.testing.assert_close(swapped.body.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():  # a deep copy: training the specialist must not move the generalist
        for param in swapped.parameters():
            param.add_(1.0)
    assert model.head.out_features == NUM_CLASSES
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# ------------------------------------------------------------------------ mlp
def test_mlp_parameter_count_by_hand() -> None:
    model = create_model("mlp", (4,), 2, hidden=(3,))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    # The paper's small MNIST net: 784-800-800-10.
    assert count_parameters(create_model("mlp", (784,), 10)) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


def test_mlp_hidden_sizes_give_linear_shapes() -> None:
    model = create_model("mlp", [4], 3, hidden=[5, 7])  # lists, as YAML gives them
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(5, 4), (7, 5), (3, 7)]


def test_mlp_without_hidden_layers_is_logistic_regression() -> None:
    model = create_model("mlp", (4,), 2, hidden=())
    assert count_parameters(model.body) == 0
    x = _batch((4,))
    torch.testing.assert_close(model(x), x @ model.head.weight.T + model.head.bias)


def test_count_parameters_trainable_only() -> None:
    model = create_model("mlp", (4,), 2, hidden=(3,))
    model.head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 4 * 3 + 3
    assert count_parameters(model) == 23


def test_mlp_dropout_only_in_training() -> None:
    regularised = create_model("mlp", (20,), 3, hidden=(50, 50), dropout=0.5, input_dropout=0.2)
    plain = create_model("mlp", (20,), 3, hidden=(50, 50))
    plain.load_state_dict(regularised.state_dict())  # named layers: same keys with or without dropout
    x = _batch((20,))
    regularised.train()
    assert not torch.equal(regularised(x), regularised(x))
    regularised.eval()
    torch.testing.assert_close(regularised(x), plain(x), rtol=0, atol=0)


def test_mlp_jitter_only_in_training() -> None:
    model = create_model("mlp", (1, 6, 6), 3, hidden=(10,), jitter=2)
    assert isinstance(model.body.jitter, JitterImages)
    x = _batch((1, 6, 6))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model.head(model.body[1:](x)), rtol=0, atol=0)


def test_jitter_needs_an_image_shape() -> None:
    with pytest.raises(ValueError, match=r"jitter=2 needs an image input_shape \(C, H, W\)"):
        create_model("mlp", (784,), 10, jitter=2)
    create_model("mlp", (784,), 10, jitter=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hidden": "800"}, "hidden must be a sequence"),
        ({"hidden": (800, 0)}, r"hidden\[1\] must be an int >= 1"),
        ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\)"),
        ({"input_dropout": -0.1}, "input_dropout must be a probability"),
        ({"jitter": 1.5}, "jitter must be an int >= 0"),
    ],
)
def test_mlp_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"model 'mlp': {message}"):
        create_model("mlp", IMAGE_SHAPE, NUM_CLASSES, **options)


# ------------------------------------------------------------------------ jitter
def _one_hot_images(size: int, shape: tuple[int, int, int], row: int, col: int) -> torch.Tensor:
    images = torch.zeros(size, *shape)
    images[:, :, row, col] = 1.0
    return images.reshape(size, -1)


def test_jitter_is_identity_in_eval() -> None:
    jitter = JitterImages((2, 5, 5), 2).eval()
    x = _batch((2, 5, 5))
    assert torch.equal(jitter(x), x)


def test_jitter_moves_a_pixel_by_at_most_jitter_and_keeps_its_mass() -> None:
    shape, j, size = (2, 9, 9), 2, 512
    out = JitterImages(shape, j).train()(_one_hot_images(size, shape, 4, 4)).reshape(size, *shape)
    assert torch.equal(out.sum(dim=(2, 3)), torch.ones(size, 2))  # 2 px from the border: nothing falls off
    assert torch.equal(out[:, 0], out[:, 1])  # channels of one example share the shift
    where = out[:, 0].reshape(size, -1).argmax(dim=1)
    shifts = {(int(i) // 9 - 4, int(i) % 9 - 4) for i in where}
    assert all(abs(dy) <= j and abs(dx) <= j for dy, dx in shifts)
    assert len(shifts) == (2 * j + 1) ** 2  # every shift in [-j, j]^2 happens, per example


def test_jitter_drops_pixels_shifted_off_the_border() -> None:
    out = JitterImages((1, 5, 5), 1).train()(_one_hot_images(256, (1, 5, 5), 0, 0))
    mass = out.sum(dim=1)
    assert set(mass.tolist()) == {0.0, 1.0}  # zeros are shifted in, the corner pixel sometimes lost


# ------------------------------------------------------------------------ cnn
def test_cnn_channels_and_hidden_shape_the_layers() -> None:
    model = create_model("cnn", (3, 16, 12), 4, channels=(6, 10), hidden=20, dropout=0.5)
    convs = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(6, 3, 3, 3), (10, 6, 3, 3)]
    assert tuple(model.body.linear.weight.shape) == (20, 10 * 4 * 3)  # 16x12 pooled twice -> 4x3
    assert model(_batch((3, 16, 12))).shape == (16, 4)


@pytest.mark.parametrize("shape", [(784,), (28, 28)])
def test_cnn_needs_an_image_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"model 'cnn' needs an image input_shape \(C, H, W\)"):
        create_model("cnn", shape, 10)


def test_cnn_rejects_images_too_small_to_pool() -> None:
    with pytest.raises(ValueError, match=r"2 pooling blocks need H, W >= 4"):
        create_model("cnn", (1, 3, 8), 10)


# ------------------------------------------------------------------------ max-norm
def _net_with_known_rows() -> nn.Module:
    model = create_model("mlp", (3,), 2, hidden=(2,))
    with torch.no_grad():
        model.body.linear1.weight.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]]))  # norms 5, 0.5
        model.head.weight.copy_(torch.tensor([[6.0, 8.0], [0.0, 1.0]]))  # norms 10, 1
    return model


def test_apply_max_norm_clamps_long_rows_and_leaves_short_ones() -> None:
    model = _net_with_known_rows()
    apply_max_norm(model, 1.0)
    expected = torch.tensor([[0.6, 0.8, 0.0], [0.3, 0.4, 0.0]])
    torch.testing.assert_close(model.body.linear1.weight, expected, rtol=0, atol=1e-6)
    assert torch.equal(model.body.linear1.weight[1], torch.tensor([0.3, 0.4, 0.0]))  # untouched, not rescaled
    assert torch.equal(model.head.weight, torch.tensor([[6.0, 8.0], [0.0, 1.0]]))  # head skipped by default


def test_apply_max_norm_can_include_the_head() -> None:
    model = _net_with_known_rows()
    apply_max_norm(model, 2.0, include_head=True)
    torch.testing.assert_close(model.head.weight, torch.tensor([[1.2, 1.6], [0.0, 1.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.body.linear1.weight.norm(dim=1), torch.tensor([2.0, 0.5]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, "3"])
def test_apply_max_norm_rejects_bad_bounds(bad: object) -> None:
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        apply_max_norm(_net_with_known_rows(), bad)


# ------------------------------------------------------------------------ registry and contract
def test_unknown_name_lists_registered_models() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; registered: \[") as info:
        create_model("resnet", IMAGE_SHAPE, NUM_CLASSES)
    assert all(name in str(info.value) for name in MODELS)


def test_unknown_option_names_the_argument_and_the_model() -> None:
    with pytest.raises(TypeError, match=r"create_model\('mlp'\).*'hiden'.*did you mean 'hidden'.*accepts: hidden"):
        create_model("mlp", IMAGE_SHAPE, NUM_CLASSES, hiden=(10,))


@pytest.mark.parametrize(
    ("shape", "classes", "message"),
    [((0, 4), 3, r"input_shape\[0\] must be an int >= 1"), ((), 3, "non-empty"), ((4,), 0, "num_classes")],
)
def test_rejects_bad_shapes_and_class_counts(shape: tuple, classes: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("mlp", shape, classes)


def test_register_model_adds_a_creatable_name_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MODELS", dict(MODELS))

    @register_model("tiny_linear")
    def tiny_linear(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return models.Classifier(input_shape, nn.Identity(), nn.Linear(math.prod(input_shape), num_classes))

    assert create_model("tiny_linear", (4,), 2)(_batch((4,))).shape == (16, 2)
    with pytest.raises(ValueError, match="'tiny_linear' is already registered"):
        register_model("tiny_linear")(tiny_linear)
    with pytest.raises(ValueError, match="without ':'"):
        register_model("a:b")


def test_check_model_contract_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match="'body' attribute"):
        check_model_contract(nn.Linear(3, 2))
    no_head = nn.Module()
    no_head.body = nn.Identity()
    with pytest.raises(ValueError, match=r"'head' attribute that is an nn.Linear \(found: missing\)"):
        check_model_contract(no_head)
    no_head.head = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"found: Sequential"):
        check_model_contract(no_head)
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        check_model_contract(object())
    with pytest.raises(ValueError, match="head has 5 outputs, expected num_classes=3"):
        check_model_contract(create_model("mlp", (4,), 5), num_classes=3)


# ------------------------------------------------------------------------ import-path models
USER_MODULE = "kdray_test_user_models"
USER_SOURCE = """
    import math
    from torch import nn
    from kdray.models import Classifier

    def tiny(*, input_shape, num_classes, width=4):
        d = math.prod(input_shape)
        return Classifier(input_shape, nn.Sequential(nn.Linear(d, width), nn.ReLU()), nn.Linear(width, num_classes))

    def headless(*, input_shape, num_classes):
        return nn.Linear(math.prod(input_shape), num_classes)

    NOT_A_FACTORY = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


def test_import_path_model_is_created_with_options(user_module: str) -> None:
    model = create_model(f"{user_module}:tiny", (2, 3), 4, width=6)
    assert model.head.in_features == 6
    assert model(_batch((2, 3))).shape == (16, 4)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (f"{USER_MODULE}.tiny", "not an import path: write it as 'package.module:factory'"),
        (f"{USER_MODULE}:", "must look like 'package.module:factory'"),
        ("kdray_no_such_module:tiny", "cannot import module 'kdray_no_such_module'"),
        (f"{USER_MODULE}:huge", f"module '{USER_MODULE}' has no attribute 'huge'"),
        (f"{USER_MODULE}:NOT_A_FACTORY", r"'NOT_A_FACTORY' is not callable \(it is a int\)"),
        (f"{USER_MODULE}:headless", r"create_model\('.*:headless'\): model Linear needs a 'body' attribute"),
    ],
)
def test_bad_import_paths_say_what_is_wrong(user_module: str, path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(path, (2, 3), 4)


def test_import_path_model_rejects_unknown_options(user_module: str) -> None:
    with pytest.raises(TypeError, match=r"'widht'.*did you mean 'width'.*accepts: width"):
        create_model(f"{user_module}:tiny", (2, 3), 4, widht=6)


def test_shift_images_moves_content_by_jitter_minus_the_offset() -> None:
    image = _one_hot_images(1, (1, 7, 7), 3, 3)
    for top, left in [(0, 0), (2, 1), (4, 4)]:
        out = models.shift_images(image, (1, 7, 7), 2, torch.tensor([top]), torch.tensor([left])).reshape(7, 7)
        assert out[3 + 2 - top, 3 + 2 - left] == 1.0 and out.sum() == 1.0  # moved by (2 - top, 2 - left)


def test_jitter_images_draws_its_offsets_from_the_generator() -> None:
    x = _batch((1, 6, 6), size=32)
    first = models.jitter_images(x, (1, 6, 6), 1, torch.Generator().manual_seed(3))
    assert torch.equal(first, models.jitter_images(x, (1, 6, 6), 1, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, x)
