"""Label-free image augmentation for distillation batches.

Distillation on a small unlabeled proxy set overfits the teacher's outputs on those few images;
random horizontal flips and random crops (from a reflect-padded image) show the student a fresh
view of each proxy image on every pass, the standard CIFAR recipe. Teacher and student see the
same augmented batch, so no label is needed and the targets stay consistent.

Pure functions over uint8 ``[batch, height, width, channels]`` arrays; keys are explicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "flip", "flip_crop")


def crop_padding(height: int, width: int) -> int:
    """Pixels of padding for random crops: 4 at CIFAR's 32x32, an eighth of the side in general."""
    return max(1, min(height, width) // 8)


def augment_images(images: jax.Array, key: jax.Array, kind: str = "flip_crop") -> jax.Array:
    """A randomly flipped and/or cropped copy of ``images`` (same shape and dtype).

    Args:
        images: ``[batch, height, width, channels]``.
        key: PRNG key; each example draws its own flip and crop offset.
        kind: "none", "flip" (horizontal, probability 1/2) or "flip_crop" (flip, then a random
            crop of the original size from the image reflect-padded by ``crop_padding``).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {list(AUGMENTATIONS)}")
    if kind == "none":
        return images
    flip_key, crop_key = jax.random.split(key)
    batch, height, width, channels = images.shape
    flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
    if kind == "flip":
        return images
    pad = crop_padding(height, width)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)
