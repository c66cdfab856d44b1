"""A small ResNet with BatchNorm and Dropout: a model from outside the CNN family, by import path.

It exists to show (and test) that fdjax trains any Flax module whose ``__call__(images, *,
train)`` returns logits, also one with state (BatchNorm's ``batch_stats``) and randomness
(``Dropout``'s ``dropout`` rng stream)::

    [models]
    global_model = "fdjax.core.resnet:resnet10"
    small_model = "fdjax.core.resnet:resnet6"

A factory is called as ``factory(num_classes=..., input_shape=...)``; a researcher's own model is
a module and a function like these in a package of their own.

Layout: a 3x3 stem convolution, then stages of basic residual blocks (two 3x3 convolutions, each
followed by BatchNorm, and a 1x1 projection where the shape changes), the first stage at
``width`` channels and each later one at twice the channels and half the resolution, then global
average pooling, Dropout and the logits.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax.core.layers import lecun_normal


def _conv(features: int, kernel_size: tuple[int, int], strides: int = 1) -> nn.Conv:
    """``nn.Conv`` without a bias, with flax's own kernel initialiser drawn so that it compiles
    in a fraction of the time (the same values: ``fdjax.core.layers.fan_in_normal``)."""
    return nn.Conv(features, kernel_size, strides=strides, use_bias=False,
                   kernel_init=lecun_normal())


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a shortcut (projected where the shape changes)."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        y = _conv(self.channels, (3, 3), strides=self.stride)(x)
        y = nn.relu(norm()(y))
        y = _conv(self.channels, (3, 3))(y)
        y = norm()(y)
        if x.shape[-1] != self.channels or self.stride != 1:
            x = norm()(_conv(self.channels, (1, 1), strides=self.stride)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A CIFAR-style ResNet.

    Attributes:
        blocks: residual blocks per stage.
        num_classes: number of logits.
        width: channels of the first stage (doubled at each later stage).
        dropout: dropout rate before the logits (0 for none).
    """

    blocks: Sequence[int]
    num_classes: int
    width: int = 16
    dropout: float = 0.1

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        x = images.astype(jnp.float32)
        if jnp.issubdtype(images.dtype, jnp.integer):
            x = x / 255.0
        x = _conv(self.width, (3, 3))((x - 0.5) / 0.25)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, count in enumerate(self.blocks):
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2 ** stage, stride)(x, train=train)
        x = jnp.mean(x, axis=(-3, -2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=lecun_normal())(x)


def resnet6(num_classes: int, input_shape: Sequence[int] = (32, 32, 3), width: int = 16,
            dropout: float = 0.1) -> ResNet:
    """Two stages of one block each (6 weight layers with the stem, projection and logits)."""
    del input_shape  # global pooling: any image size works
    return ResNet((1, 1), num_classes, width, dropout)


def resnet10(num_classes: int, input_shape: Sequence[int] = (32, 32, 3), width: int = 16,
             dropout: float = 0.1) -> ResNet:
    """Three stages of one block each (the third at 64 channels)."""
    del input_shape
    return ResNet((1, 1, 1), num_classes, width, dropout)
