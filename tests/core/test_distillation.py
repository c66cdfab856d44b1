"""Distillation loss properties and a chunk of reverse distillation through the compiled path."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fdjax.core import OptimizerSettings, distillation_loss, make_model, make_optimizer
from fdjax.core.distillation import kl_divergence
from fdjax.data import load_synthetic
from fdjax.runtime import Distiller, LocalTrainer
from fdjax.runtime.compiled import as_device_data

loss_fn = jax.jit(distillation_loss, static_argnums=(2,))
logits = hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(2, 10)),
                    elements=st.floats(-30, 30, width=32))


@settings(deadline=None, max_examples=60)
@given(st.data(), st.sampled_from([0.5, 1.0, 2.0, 5.0]))
def test_loss_is_never_negative(data, temperature):
    student = data.draw(logits)
    teacher = data.draw(hnp.arrays(np.float32, student.shape,
                                   elements=st.floats(-30, 30, width=32)))
    assert float(loss_fn(student, teacher, temperature)) >= 0.0


@settings(deadline=None, max_examples=60)
@given(logits, st.floats(-50, 50, width=32), st.sampled_from([1.0, 2.0, 4.0]))
def test_loss_is_zero_when_logits_agree_up_to_a_constant_shift(student, shift, temperature):
    assert float(loss_fn(student, student, temperature)) == 0.0
    assert float(loss_fn(student, student + np.float32(shift), temperature)) == pytest.approx(
        0.0, abs=1e-4)


def test_loss_is_positive_when_predictions_differ_and_scales_with_t_squared():
    student = jnp.asarray([[2.0, 0.0, -1.0]])
    teacher = jnp.asarray([[-1.0, 0.5, 2.0]])
    assert float(distillation_loss(student, teacher, 1.0)) > 0.1
    kl_t = kl_divergence(student, teacher, 3.0) / 9.0
    manual = jax.nn.softmax(teacher / 3.0) * (jax.nn.log_softmax(teacher / 3.0)
                                               - jax.nn.log_softmax(student / 3.0))
    np.testing.assert_allclose(kl_t, manual.sum(-1), rtol=1e-5)


def test_mask_and_label_mixing():
    student = jnp.asarray([[2.0, 0.0], [0.0, 2.0]])
    teacher = jnp.asarray([[2.0, 0.0], [2.0, 0.0]])
    masked = distillation_loss(student, teacher, 1.0, mask=jnp.asarray([1.0, 0.0]))
    assert float(masked) == pytest.approx(0.0, abs=1e-6)
    with_labels = distillation_loss(student, student, 1.0, labels=jnp.asarray([1, 0]),
                                    label_weight=0.5)
    assert float(with_labels) > 0.5  # cross-entropy of wrong labels, KD part is zero


@pytest.fixture(scope="module")
def toy():
    """A briefly trained small teacher and a fresh large student on 8x8 synthetic data."""
    data = load_synthetic(512, (8, 8, 3), 10, seed=3)
    small = make_model("cnn6", input_shape=(8, 8, 3), width=0.25)
    large = make_model("cnn12", input_shape=(8, 8, 3), width=0.25)
    device = as_device_data(data.arrays())
    trainer = LocalTrainer(small, make_optimizer(), batch_size=32)
    state = trainer.init(small.init(jax.random.key(0)))
    for epoch in range(2):
        state, _ = trainer.epoch(state, device, jax.random.key(epoch))
    return small, large, state.params, large.init(jax.random.key(1)), {"images": device["images"]}


def proxy_loss(large, small, student_params, teacher_params, images) -> float:
    return float(distillation_loss(large.apply_fn(student_params, images),
                                   small.apply_fn(teacher_params, images), 2.0))


@pytest.mark.parametrize("driver", ["loop", "scan"])
def test_a_chunk_of_reverse_distillation_lowers_the_loss(toy, driver):
    small, large, teacher, student, proxy = toy
    distiller = Distiller(large, small, make_optimizer(OptimizerSettings("adam", 3e-3)),
                          batch_size=64, steps=15, temperature=2.0, driver=driver)
    before = proxy_loss(large, small, student, teacher, proxy["images"])
    state, stats = distiller.chunk(distiller.init(student), teacher, proxy, jax.random.key(2))
    after = proxy_loss(large, small, state.params, teacher, proxy["images"])
    assert after < 0.85 * before
    assert float(stats["count"]) == 15 * 64
    chex.assert_tree_all_finite(state.params)


def test_loop_and_scan_chunks_agree(toy):
    small, large, teacher, student, proxy = toy
    results = []
    for driver in ("loop", "scan"):
        distiller = Distiller(large, small, make_optimizer(), batch_size=32, steps=4,
                              driver=driver)
        state, stats = distiller.chunk(distiller.init(student), teacher, proxy, jax.random.key(5))
        results.append((state.params, stats))
    chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-3)
    chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-3)


def test_label_weight_needs_labels(toy):
    small, large, teacher, student, proxy = toy
    distiller = Distiller(large, small, make_optimizer(), 32, 2, label_weight=0.3)
    with pytest.raises(ValueError, match="keeps its labels"):
        distiller.chunk(distiller.init(student), teacher, proxy, jax.random.key(0))
