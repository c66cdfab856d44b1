"""The CNN family: the paper's presets, any input size from 8x8, widths, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.core import count_params, make_model


def weight_layers(params) -> list[str]:
    return sorted(params["params"])


@pytest.mark.parametrize("preset, convs, denses", [("cnn6", 4, 2), ("cnn12", 10, 2)])
def test_presets_have_the_papers_depth(preset, convs, denses):
    model = make_model(preset)
    layers = weight_layers(model.init(jax.random.key(0)))
    assert sum(name.startswith("Conv") for name in layers) == convs
    assert sum(name.startswith("Dense") for name in layers) == denses
    assert len(layers) == (6 if preset == "cnn6" else 12)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3), (37, 45, 2)])
@pytest.mark.parametrize("preset", ["cnn6", "cnn12"])
def test_any_input_size_from_8x8_and_any_class_count(preset, shape):
    model = make_model(preset, input_shape=shape, num_classes=7, width=0.25)
    params = model.init(jax.random.key(1))
    logits = model.apply_fn(params, jnp.zeros((3,) + shape, jnp.uint8))
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_width_multiplier_scales_the_model_and_cnn12_is_larger():
    sizes = {w: count_params(make_model("cnn6", width=w).init(jax.random.key(0)))
             for w in (0.5, 1.0)}
    assert sizes[0.5] < sizes[1.0]
    assert count_params(make_model("cnn12").init(jax.random.key(0))) > sizes[1.0]


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_stateless_normalisation_options(norm):
    model = make_model("cnn6", input_shape=(8, 8, 1), width=0.5, norm=norm)
    params = model.init(jax.random.key(0))
    assert model.apply_fn(params, jnp.zeros((2, 8, 8, 1), jnp.uint8)).shape == (2, 10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="cnn7"), "unknown model preset 'cnn7'"),
    (dict(preset="cnn6", input_shape=(7, 8, 3)), "height and width >= 8"),
    (dict(preset="cnn6", num_classes=1), "num_classes"),
    (dict(preset="cnn6", width=0.0), "width"),
    (dict(preset="cnn6", norm="batch"), "unknown norm"),
])
def test_bad_model_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_model(**kwargs)
