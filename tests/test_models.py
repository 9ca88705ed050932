"""The built-in models (emberfl.models) and their selector, Models."""

from __future__ import annotations

import doctest
import importlib
import pickle

import pytest
import torch

from emberfl.core import deserialize_model, serialize_model
from emberfl.errors import ConfigError
from emberfl.models import MODEL_NAMES, TOKEN_MODELS, ModelName, Models

SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "cifar": (3, 32, 32),
}
# Which (model, input) pairs work; the others must fail with ConfigError.
WORKS = {
    ("cnn", "mnist"),
    ("cnn", "cifar"),
    ("small-cnn", "digits"),
    ("small-cnn", "mnist"),
    ("small-cnn", "cifar"),
    ("mlp", "digits"),
    ("mlp", "mnist"),
    ("mlp", "cifar"),
    ("resnet18", "digits"),
    ("resnet18", "cifar"),
}


@pytest.mark.parametrize(("name", "data"), sorted(WORKS))
def test_models_map_images_to_logits(name: str, data: str) -> None:
    shape = SHAPES[data]
    model = Models(input_shape=shape, num_classes=7, seed=1).select_model(name)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_tutorial_cnn_is_the_pytorch_tutorial_network() -> None:
    model = Models(input_shape=(3, 32, 32), num_classes=10).select_model(ModelName.CNN)
    assert sum(p.numel() for p in model.parameters()) == 62006
    assert [tuple(p.shape) for p in model.parameters()][:2] == [(6, 3, 5, 5), (6,)]


@pytest.mark.parametrize(
    ("name", "shape", "fragment"),
    [
        ("cnn", (1, 8, 8), "at least 16x16"),
        ("small-cnn", (1, 3, 3), "at least 4x4"),
        ("resnet18", (3, 4, 4), "at least 8x8"),
        ("cnn", (64,), "(channels, height, width)"),
    ],
)
def test_too_small_inputs_are_config_errors(
    name: str, shape: tuple[int, ...], fragment: str
) -> None:
    with pytest.raises(ConfigError, match="model") as info:
        Models(input_shape=shape, num_classes=10).select_model(name)
    assert fragment in str(info.value)


def test_mlp_takes_flat_inputs() -> None:
    model = Models(input_shape=(64,), num_classes=10).select_model("mlp")
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vgg'") as info:
        Models(input_shape=(1, 8, 8), num_classes=10).select_model("vgg")
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"input_shape": ()}, {"input_shape": (0, 8)}])
def test_selector_checks_its_fields(bad: dict[str, object]) -> None:
    kwargs: dict[str, object] = {"input_shape": (1, 8, 8), "num_classes": 10, **bad}
    with pytest.raises(ConfigError):
        Models(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_is_a_function_of_seed_and_leaves_global_rng_alone(name: str) -> None:
    tokens = name in TOKEN_MODELS
    shape = (20,) if tokens else (3, 32, 32)
    vocab = 30 if tokens else None

    def build(seed: int) -> torch.Tensor:
        models = Models(input_shape=shape, num_classes=10, seed=seed, vocab_size=vocab)
        return serialize_model(models.select_model(name))

    before = torch.get_rng_state()
    a, b, c = build(5), build(5), build(6)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_selector_pickles_for_worker_processes() -> None:
    models = Models(input_shape=(1, 8, 8), num_classes=10, seed=3)
    clone = pickle.loads(pickle.dumps(models))
    assert clone == models
    assert torch.equal(
        serialize_model(clone.select_model("small-cnn")),
        serialize_model(models.select_model("small-cnn")),
    )


def test_resnet_state_round_trips_through_serialize_model() -> None:
    """BatchNorm buffers (including the int64 num_batches_tracked) survive FedAvg's flat form."""
    models = Models(input_shape=(3, 8, 8), num_classes=10, seed=0)
    trained = models.select_model("resnet18")
    trained.train()
    trained(torch.rand(4, 3, 8, 8))  # updates running stats and num_batches_tracked
    fresh = models.select_model("resnet18")
    deserialize_model(fresh, serialize_model(trained))
    for (key, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert a.dtype == b.dtype, key
        assert torch.equal(a, b), key


@pytest.mark.parametrize("module", ["emberfl.models", "emberfl.models.selector"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
