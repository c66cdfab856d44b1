"""Label-free augmentation: every output is a flip and/or shifted crop of its own input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.core import make_model, make_optimizer
from fdjax.core.augment import augment_images, crop_padding
from fdjax.core.distillation import distill_step
from fdjax.core.training import init_train_state


def numbered_images(batch=16, size=8, channels=1):
    """Images whose every pixel of one image is distinct, so a crop's offset is identifiable."""
    base = np.arange(size * size * channels, dtype=np.uint8).reshape(size, size, channels)
    return jnp.asarray(np.stack([base + i for i in range(batch)]))


def views(image: np.ndarray, kind: str):
    """Every image ``augment_images`` may produce from ``image``."""
    flips = [image, image[:, ::-1]] if kind != "none" else [image]
    if kind != "flip_crop":
        return flips
    h, w, _ = image.shape
    pad = crop_padding(h, w)
    out = []
    for flipped in flips:
        padded = np.pad(flipped, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        for dy, dx in itertools.product(range(2 * pad + 1), repeat=2):
            out.append(padded[dy:dy + h, dx:dx + w])
    return out


@pytest.mark.parametrize("kind", ["none", "flip", "flip_crop"])
def test_each_output_is_a_view_of_its_own_input(kind):
    images = numbered_images()
    out = np.asarray(augment_images(images, jax.random.key(3), kind))
    assert out.shape == images.shape and out.dtype == np.uint8
    for original, augmented in zip(np.asarray(images), out):
        assert any(np.array_equal(augmented, v) for v in views(original, kind))


def test_flip_crop_draws_different_views_per_example_and_per_key():
    images = jnp.asarray(np.repeat(numbered_images(1), 64, axis=0))
    a = np.asarray(augment_images(images, jax.random.key(0)))
    b = np.asarray(augment_images(images, jax.random.key(1)))
    assert len({x.tobytes() for x in a}) > 8  # one image, many views within a batch
    assert not np.array_equal(a, b)
    assert np.array_equal(a, np.asarray(augment_images(images, jax.random.key(0))))


def test_unknown_augmentation_is_rejected():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment_images(numbered_images(), jax.random.key(0), "rotate")


def test_augmented_distillation_step_uses_its_key_and_plain_one_ignores_it():
    model = make_model("cnn6", input_shape=(8, 8, 1), num_classes=10, width=0.25)
    teacher = make_model("cnn6", input_shape=(8, 8, 1), num_classes=10, width=0.25)
    optimizer = make_optimizer()
    state = init_train_state(model.init(jax.random.key(0)), optimizer)
    batch = {"images": numbered_images(), "mask": jnp.ones((16,), jnp.float32)}
    tparams = teacher.init(jax.random.key(1))

    def step(kind, seed):
        new, metrics = distill_step(state, tparams, batch, jax.random.key(seed),
                                    student_train=model.train_fn, teacher_apply=teacher.apply_fn,
                                    optimizer=optimizer, temperature=2.0, augment=kind)
        return new.params, float(metrics["loss_sum"])

    (p0, l0), (p1, l1) = step("flip_crop", 0), step("flip_crop", 1)
    assert l0 != l1 and np.isfinite([l0, l1]).all()
    (q0, m0), (q1, m1) = step("none", 0), step("none", 1)
    assert m0 == m1
    jax.tree_util.tree_map(np.testing.assert_array_equal, q0, q1)
