"""A convolution and a max-pool whose gradients XLA CPU computes several times faster.

The forward values are XLA's own; only the backward pass is written out, because XLA CPU is slow
at three gradients the CNN family needs on every step:

* **A convolution's weight gradient.** XLA CPU lowers it to a convolution whose kernel is the
  whole output-gradient map (32x32 at CIFAR resolution), which its convolution runtime handles
  poorly: on this project's 2-core CPU a 3x3, 32->32 channel convolution on a batch of 64 took
  about 22 ms forward and 23 ms for the input gradient, but 110-410 ms for the weight gradient.
  Written as one matrix product per kernel tap (``kh * kw`` products of the shifted input,
  ``(N*H*W, C_in)^T @ (N*H*W, C_out)``) the same gradient took about 70 ms. (At a batch of 32 the two were about even, and with the
  YNNPACK kernels that ``fdjax.runtime.compiled`` asks XLA CPU for, XLA's own was faster: so this
  one is used only with ``grads="matmul"``.)
* **A max-pool's gradient.** JAX differentiates ``lax.reduce_window`` through a select-and-scatter
  that took about 43 ms for a 2x2 pool of a (64, 32, 32, 32) map; the gradient written as a one-hot
  of each window's first maximum, on reshaped windows, took about 9 ms.
* **A convolution's bias gradient**, the output gradient summed over batch, height and width:
  XLA CPU reduces the outer axes of an NHWC map far below memory speed (2.2 ms for a
  (32, 32, 32, 32) map); a row of ones times the map seen as ``(N*H*W, C)`` goes to its dot
  kernels and took 0.7 ms. With the pool's gradient, ``cnn6``'s whole training step at batch 32
  ran about 7% faster (``add_bias``).

The gradients equal XLA's up to float rounding (the convolution's weight and bias gradients sum
in a different order: relative differences of about 1e-6); the pool's gradient goes, like XLA's,
to one maximum of each window. Measured figures and the whole-model effect:
``experiments/bench_local_training/``. On accelerators XLA's own gradients are fast, so
``make_model``'s ``grads="auto"`` writes out only the pool's and the biases' gradients, and only
where the default backend is the CPU.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: How the CNN's backward pass is computed: "xla" (XLA's own gradients), "pool" (the max-pool's
#: and the convolutions' bias gradients written out here) or "matmul" (those and the
#: convolutions' weight gradients written out).
GRADS = ("xla", "pool", "matmul")

_DIMS = ("NHWC", "HWIO", "NHWC")


def resolve_grads(grads: str) -> str:
    """``"auto"`` -> ``"pool"`` on a CPU default backend, ``"xla"`` elsewhere.

    The convolutions' matmul weight gradient ("matmul") is not the CPU default: it wins only with
    XLA's own CPU dot and convolution kernels, and fdjax compiles its programs with the faster
    YNNPACK kernels where the installed XLA has them (``fdjax.runtime.compiled``), with which
    XLA's own weight gradient was faster (``experiments/bench_local_training/``).
    """
    if grads == "auto":
        return "pool" if jax.default_backend() == "cpu" else "xla"
    if grads not in GRADS:
        raise ValueError(f"unknown gradient implementation {grads!r}; "
                         f"choose one of {['auto', *GRADS]}")
    return grads


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


def _same_pads(size: int) -> tuple[int, int]:
    """XLA's "SAME" padding for stride 1: the extra pixel of an even kernel goes after."""
    return (size - 1) // 2, size - 1 - (size - 1) // 2


def _kernel_grad(x: jax.Array, dy: jax.Array, kh: int, kw: int) -> jax.Array:
    """The weight gradient of a stride-1 "SAME" convolution, one matrix product per kernel tap.

    Tap (i, j) of the kernel sees the input shifted by (i, j) in the padded map, so its gradient is
    ``shifted.reshape(-1, C_in).T @ dy.reshape(-1, C_out)``. The optimization barrier makes XLA
    copy each shifted view into a contiguous array first: fused into the product as a strided
    operand, the same product ran several times slower.
    """
    height, width, channels = x.shape[-3:]
    xp = jnp.pad(x, ((0, 0),) * (x.ndim - 3) + (_same_pads(kh), _same_pads(kw), (0, 0)))
    flat_dy = dy.reshape(-1, dy.shape[-1])
    taps = [[lax.optimization_barrier(
                xp[..., i:i + height, j:j + width, :].reshape(-1, channels)).T @ flat_dy
             for j in range(kw)] for i in range(kh)]
    return jnp.stack([jnp.stack(row) for row in taps])


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 "SAME" convolution, NHWC input and HWIO kernel, with the matmul weight gradient."""
    return _conv(x, kernel)


def _conv_same_fwd(x, kernel):
    return _conv(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, dy):
    x, kernel = residuals
    dx = jax.vjp(lambda v: _conv(v, kernel), x)[1](dy)[0]
    dk = _kernel_grad(x, dy, kernel.shape[0], kernel.shape[1]).astype(kernel.dtype)
    return dx, dk


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over the last axis, whose bias gradient is a matrix product.

    The bias gradient sums the output gradient over every axis but the channels. XLA CPU
    lowers that sum to a reduction over the outer axes of an NHWC map, which it runs far below
    memory speed (2.2 ms for a (32, 32, 32, 32) map on the 2-core CPU); a row of ones times the
    map seen as ``(N*H*W, C)`` is the same sum as a dot product, which XLA hands to its fast
    dot kernels (0.7 ms). The sums agree to float rounding (a different order of additions).
    """
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, dy):
    flat = dy.reshape(-1, dy.shape[-1])
    ones = jnp.ones((1, flat.shape[0]), dy.dtype)
    return dy, jnp.dot(ones, flat, preferred_element_type=jnp.float32)[0].astype(dy.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _windows(x: jax.Array) -> jax.Array:
    """(..., H, W, C) -> (..., H//2, W//2, C, 4): the 2x2 windows of a VALID pool, last axis."""
    *lead, height, width, channels = x.shape
    h2, w2 = height // 2, width // 2
    x = x[..., :2 * h2, :2 * w2, :].reshape(*lead, h2, 2, w2, 2, channels)
    n = len(lead)
    return jnp.moveaxis(x, (n + 1, n + 3), (-2, -1)).reshape(*lead, h2, w2, channels, 4)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 and VALID padding (an odd last row or column is dropped)."""
    return _windows(x).max(axis=-1)


def _max_pool_fwd(x):
    return max_pool_2x2(x), x


def _max_pool_bwd(x, dy):
    windows = _windows(x)
    first = jnp.argmax(windows, axis=-1)
    grads = jnp.where(jnp.arange(4) == first[..., None], dy[..., None], 0).astype(x.dtype)
    *lead, h2, w2, channels, _ = grads.shape
    n = len(lead)
    grads = grads.reshape(*lead, h2, w2, channels, 2, 2)
    grads = jnp.moveaxis(grads, (-2, -1), (n + 1, n + 3)).reshape(*lead, 2 * h2, 2 * w2, channels)
    height, width = x.shape[-3:-1]
    pads = ((0, 0),) * n + ((0, height - 2 * h2), (0, width - 2 * w2), (0, 0))
    return (jnp.pad(grads, pads),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


#: Sizes a kernel's numbers are drawn over (``fan_in_normal``): powers of four from 4,096.
_DRAW_SIZES = tuple(4 ** k for k in range(6, 17))


def _draw_size(count: int) -> int:
    for size in _DRAW_SIZES:
        if size >= count:
            return size
    return count  # beyond 4**16 numbers: the kernel's own size


def fan_in_normal(scale: float) -> Callable[..., jax.Array]:
    """``nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")`` (flax's
    ``lecun_normal`` at 1, ``he_normal`` at 2), the same values bit for bit, compiled for a
    handful of sizes instead of once per kernel shape.

    Why: JAX's random numbers (threefry, ``jax_threefry_partitionable``) take XLA CPU long to
    compile: a truncated-normal draw over a 4-d kernel shape took 4.5 s, over a matrix or a
    vector 0.3-0.45 s, and a model initialises op by op, so each distinct kernel shape paid that
    once per process (a tiny ``cnn6`` run spent 4.3 of its 16 s of compilation on six of them).
    Under ``jax_threefry_partitionable`` (JAX's default) element ``i`` of a draw depends only on
    the key and its row-major index ``i``, not on the shape: a kernel's numbers are the first
    ``prod(shape)`` of a flat draw of any larger size, reshaped. So every kernel is drawn over
    the next of a few fixed sizes (powers of four from 4,096), scaled, cut and reshaped on the
    host: one compiled draw serves every kernel of that size class in the process, across
    models, and the suite's and a Ray node's persistent compilation cache keep them across
    processes. The scale is computed as flax computes it (``prod(shape[:-1])`` is the fan-in for
    the default axes), so no parameter, checkpoint or result changes;
    ``tests/core/test_layers.py`` checks the values against flax's own initialisers on many
    shapes and dtypes.
    """
    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"a fan-in initialiser needs a kernel of 2 or more axes, got {shape}")
        dtype = jnp.dtype(dtype)
        # flax: fan_in = shape[-2] * prod(shape) / shape[-2] / shape[-1], exact in floats here
        variance = jnp.array(scale / float(math.prod(shape[:-1])), dtype=dtype)
        stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
        count = math.prod(shape)
        numbers = jax.random.truncated_normal(key, -2, 2, (_draw_size(count),), dtype) * stddev
        try:  # cut and reshaped on the host: on the device each kernel shape compiles a slice
            # and a reshape of its own (two small programs per shape, about 0.1 s each on CPU)
            return jnp.asarray(np.asarray(numbers)[:count].reshape(shape))
        except jax.errors.TracerArrayConversionError:  # under jit or eval_shape: traced
            return numbers[:count].reshape(shape)
    return init


def he_normal() -> Callable[..., jax.Array]:
    """``nn.initializers.he_normal()``, the same values, quick to compile (``fan_in_normal``)."""
    return fan_in_normal(2.0)


def lecun_normal() -> Callable[..., jax.Array]:
    """``nn.initializers.lecun_normal()`` (flax's default for kernels), the same values, quick to
    compile (``fan_in_normal``)."""
    return fan_in_normal(1.0)


class Conv(nn.Module):
    """``nn.Conv(features, kernel_size, padding="SAME")`` with gradients written out for XLA CPU.

    The bias gradient is always the matrix product of ``add_bias``; the kernel's weight gradient
    is the matmul one of ``conv_same`` with ``kernel_grad="matmul"`` and XLA's own with
    ``"xla"``. Same parameter names, shapes and initialisers (their values, drawn quicker to
    compile: ``fan_in_normal``) as ``nn.Conv``, so a parameter tree made by one loads into the
    other.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    dtype: Any = jnp.float32
    kernel_grad: str = "matmul"
    kernel_init: Any = lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.kernel_grad not in ("matmul", "xla"):
            raise ValueError(f"unknown kernel_grad {self.kernel_grad!r}; choose 'matmul' or 'xla'")
        y = conv_same(x, kernel) if self.kernel_grad == "matmul" else _conv(x, kernel)
        return add_bias(y, bias)
