"""Knowledge distillation between two models (any two Flax modules with the same classes).

One loss and one step serve both directions of the paper: forward distillation (the large global
model teaches the small distilled model) and reverse distillation (the averaged small model teaches
the large global model). Which model is teacher is only a matter of which apply functions and
parameters are passed.

The loss is Hinton et al.'s temperature-scaled KL divergence, ``T^2 * KL(softmax(t/T) ||
softmax(s/T))``; the ``T^2`` keeps gradient magnitudes comparable across temperatures. Where the
distillation set keeps its labels, ``label_weight`` mixes in cross-entropy (as FedGKT does):
``(1 - label_weight) * KD + label_weight * CE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fdjax.core.augment import augment_images
from fdjax.core.training import (ApplyFn, Metrics, TrainFn, TrainState, sample_plan, scan_steps,
                                 with_state)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float) -> jax.Array:
    """Per-example ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``; shape ``[batch]``.

    The gradient with respect to the student's logits is ``T * (softmax(s/T) - softmax(t/T))``
    to float32 precision everywhere, also when the student is within rounding of its teacher:
    the value is clipped at 0 (float rounding can make a KL of nearly identical distributions
    come out a hair negative), but only the value, never the gradient. Clipping the value with
    ``maximum`` would zero the gradient of every such example, which is the late phase of every
    reverse distillation.

    A class the teacher gives probability 0 (a logit of ``-inf``, a masked class) adds nothing:
    ``0 * log 0`` is taken as 0, not NaN.
    """
    t = jnp.asarray(temperature, jnp.float32)
    teacher_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    teacher_p = jnp.exp(teacher_logp)
    held = teacher_p > 0
    terms = jnp.where(held, teacher_p * (jnp.where(held, teacher_logp, 0.0) - student_logp), 0.0)
    kl = jnp.sum(terms, axis=-1)
    # The value clipped at 0, the gradient that of the unclipped KL (a straight-through clip).
    kl = kl + jax.lax.stop_gradient(jnp.maximum(kl, 0.0) - kl)
    return t * t * kl


#: Teachers of reverse distillation (``distill.teacher``): the averaged small model, or the
#: ensemble of the clients' models with their logits averaged (FedDF).
TEACHERS = ("average", "ensemble")


def ensemble_apply(apply_fn: ApplyFn) -> ApplyFn:
    """An apply function over a sequence of models: the mean of their logits (FedDF's teacher).

    Averaging logits, not probabilities, is FedDF's choice (Lin et al. 2020): the softened
    targets are then ``softmax(mean(logits) / T)``. Traced once per number of members.
    """
    def apply(members: Sequence[Any], images: jax.Array) -> jax.Array:
        logits = [apply_fn(m, images).astype(jnp.float32) for m in members]
        return sum(logits[1:], logits[0]) / len(logits)
    return apply


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                      mask: jax.Array | None = None, labels: jax.Array | None = None,
                      label_weight: float = 0.0) -> jax.Array:
    """Masked mean distillation loss, optionally mixed with cross-entropy on ``labels``.

    Args:
        student_logits: ``[batch, classes]``.
        teacher_logits: ``[batch, classes]``; treated as a constant (no gradient flows to it).
        temperature: softening temperature ``T > 0``.
        mask: ``[batch]`` non-negative weights of the examples (padding 0); all ones when
            omitted. The loss is their weighted mean ``sum(w * loss) / sum(w)``, 0 when every
            weight is 0 (a batch of padding only).
        labels: integer labels, where the distillation set keeps them.
        label_weight: weight of cross-entropy in ``[0, 1]``; ignored without labels.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    per_example = kl_divergence(student_logits, teacher_logits, temperature)
    if labels is not None and label_weight:
        ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)
        per_example = (1.0 - label_weight) * per_example + label_weight * ce
    if mask is None:
        mask = jnp.ones(per_example.shape, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    total = jnp.sum(mask)
    # Padding examples (weight 0) may hold anything; never let their loss reach the sum.
    weighted = jnp.where(mask > 0, per_example * mask, 0.0)
    return jnp.where(total > 0, jnp.sum(weighted) / jnp.where(total > 0, total, 1.0), 0.0)


def distill_step(state: TrainState, teacher_params: Any, batch: dict[str, jax.Array],
                 key: jax.Array, *, student_train: TrainFn, teacher_apply: ApplyFn,
                 optimizer: optax.GradientTransformation, temperature: float,
                 label_weight: float = 0.0, augment: str = "none") -> tuple[TrainState, Metrics]:
    """One optimizer step of the student towards the teacher on ``batch``.

    ``augment`` (see ``fdjax.core.augment``) draws a fresh flipped/cropped view of the batch from
    ``key``; teacher and student see the same view. The teacher runs in evaluation mode
    (``teacher_apply``: no dropout, BatchNorm's running statistics), the student in training
    mode (``student_train``: dropout from a key folded from ``key``, its BatchNorm statistics
    updated on the distillation batches as local training updates them on a client's).

    Returns the new student state and summed metrics: ``loss_sum`` (distillation loss),
    ``agree`` (examples where student and teacher predict the same class) and ``count``.
    """
    images = augment_images(batch["images"], key, augment)
    teacher_logits = teacher_apply(teacher_params, images)
    labels = batch.get("labels") if label_weight else None
    mask = batch["mask"]

    dropout_key = jax.random.fold_in(key, 1)

    def loss_fn(params):
        student_logits, model_state = student_train(params, images, dropout_key)
        loss = distillation_loss(student_logits, teacher_logits, temperature, mask, labels,
                                 label_weight)
        return loss, (student_logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    count = jnp.sum(mask)
    agree = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)) * mask)
    metrics = {"loss_sum": loss * count, "agree": agree.astype(jnp.float32), "count": count}
    params = with_state(optax.apply_updates(state.params, updates), model_state)
    return TrainState(params, opt_state), metrics


def distill_plan(key: jax.Array, num_examples: int, batch_size: int, steps: int):
    """The batches of one distillation chunk (see ``fdjax.core.training.sample_plan``)."""
    return sample_plan(key, num_examples, batch_size, steps)


def scan_distill_chunk(state: TrainState, teacher_params: Any, data: dict[str, jax.Array],
                       key: jax.Array, *, steps: int, batch_size: int, **step_settings
                       ) -> tuple[TrainState, Metrics]:
    """A chunk of ``steps`` distillation steps as one ``lax.scan``.

    ``step_settings`` are ``distill_step``'s keyword arguments (apply functions, optimizer,
    temperature, label weight, augmentation).
    """
    plan_key, step_key = jax.random.split(key)
    plan = distill_plan(plan_key, data["images"].shape[0], batch_size, steps)
    step = lambda s, t, b, k: distill_step(s, t, b, k, **step_settings)
    return scan_steps(step, state, data, plan, step_key, teacher_params)
