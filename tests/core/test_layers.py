"""The written-out convolution and pool gradients equal XLA's, and change nothing else."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdjax.config import ModelsConfig, _GRADS
from fdjax.core import make_model
from fdjax.core.layers import Conv, add_bias, conv_same, max_pool_2x2, resolve_grads


def _xla_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _normal(seed, shape):
    """Test inputs drawn by numpy: a JAX draw over a 4-d or 5-d shape takes XLA CPU seconds to
    compile (``fdjax.core.layers.fan_in_normal``), once per shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rel(a, b):
    return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))


@pytest.mark.parametrize("kernel", [(3, 3), (2, 2), (1, 3), (5, 5)])
@pytest.mark.parametrize("shape", [(4, 9, 9, 3), (2, 7, 10, 5), (3, 1, 1, 2)])
def test_convolution_gradients_equal_xlas(kernel, shape):
    x = _normal(0, shape)
    w = _normal(1, kernel + (shape[-1], 4))
    dy = _normal(2, shape[:-1] + (4,))
    both = jax.jit(lambda f, x, w, dy: (lambda out, vjp: (out, vjp(dy)))(*jax.vjp(f, x, w)),
                   static_argnums=0)
    (out, grads), (ref_out, ref_grads) = both(conv_same, x, w, dy), both(_xla_conv, x, w, dy)
    assert (out == ref_out).all()
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel(got, want) < 1e-5


def test_convolution_gradient_under_vmap_as_a_cohort_takes_it():
    xs = _normal(0, (3, 2, 8, 8, 3))
    ws = _normal(1, (3, 3, 3, 3, 6))
    grad = lambda f: jax.vmap(jax.grad(lambda w, x: (f(x, w) ** 2).sum()))
    assert _rel(jax.jit(grad(conv_same))(ws, xs), grad(_xla_conv)(ws, xs)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (1, 3, 2, 1)])
def test_pool_values_and_gradients_equal_flax_even_with_ties(shape):
    # Small integers make ties inside windows common; the gradient must pick the same maximum.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape).astype(np.float32))
    weights = jnp.arange(1.0, 1.0 + shape[-1])
    ref = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    assert (max_pool_2x2(x) == ref(x)).all()
    got = jax.grad(lambda v: (max_pool_2x2(v) * weights).sum())(x)
    want = jax.grad(lambda v: (ref(v) * weights).sum())(x)
    assert (got == want).all()


# cnn6 on the images of the initialisation test below, whose draws and layers it then shares
# (each new shape compiles anew); cnn12 on odd sizes, which pooling halves down to 1.
@pytest.mark.parametrize("preset,shape", [("cnn6", (8, 8, 3)), ("cnn12", (10, 10, 1))])
@pytest.mark.parametrize("grads", ["pool", "matmul"])
def test_models_have_the_same_parameters_values_and_gradients_either_way(preset, shape, grads):
    xla = make_model(preset, input_shape=shape, width=0.25, grads="xla")
    mat = make_model(preset, input_shape=shape, width=0.25, grads=grads)
    assert (xla.module.grads, mat.module.grads) == ("xla", grads)
    p_xla, p_mat = xla.init(jax.random.key(0)), mat.init(jax.random.key(0))
    assert jax.tree_util.tree_structure(p_xla) == jax.tree_util.tree_structure(p_mat)
    assert all((a == b).all() for a, b in zip(jax.tree_util.tree_leaves(p_xla),
                                              jax.tree_util.tree_leaves(p_mat)))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8,) + shape, np.uint8))
    labels = jnp.arange(8) % 10
    assert (xla.apply_fn(p_xla, images) == mat.apply_fn(p_xla, images)).all()
    loss = lambda model: jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply_fn(p, images), labels).mean()))
    g_xla, g_mat = loss(xla)(p_xla), loss(mat)(p_xla)
    for a, b in zip(jax.tree_util.tree_leaves(g_mat), jax.tree_util.tree_leaves(g_xla)):
        assert _rel(a, b) < 1e-4


def test_conv_layer_keeps_dtype_and_flax_names():
    layer = Conv(4, (3, 3), dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "params": {"kernel": (3, 3, 2, 4), "bias": (4,)}}
    assert layer.apply(params, jnp.ones((1, 8, 8, 2))).dtype == jnp.bfloat16
    grads = jax.grad(lambda p: layer.apply(p, jnp.ones((1, 8, 8, 2))).astype(jnp.float32).sum())(
        params)
    assert grads["params"]["kernel"].dtype == jnp.float32
    with pytest.raises(ValueError, match="kernel_grad 'fast'"):
        Conv(4, kernel_grad="fast").init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))


def test_auto_writes_gradients_out_on_cpu_only_and_bad_names_are_refused():
    assert resolve_grads("auto") == ("pool" if jax.default_backend() == "cpu" else "xla")
    assert make_model("cnn6").module.grads == resolve_grads("auto")
    with pytest.raises(ValueError, match="unknown gradient implementation 'fast'"):
        make_model("cnn6", grads="fast")
    for name in _GRADS:  # every name the config accepts builds a model
        make_model("cnn6", input_shape=(8, 8, 1), grads=name)
    assert ModelsConfig().grads == "auto"
    with pytest.raises(ValueError, match="grads"):
        ModelsConfig(grads="fast")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gradient_is_the_sum_over_everything_but_channels(dtype):
    y = _normal(0, (4, 5, 6, 3)).astype(dtype)
    bias = jnp.arange(3.0).astype(dtype)
    dy = _normal(1, y.shape).astype(dtype)
    out, vjp = jax.vjp(add_bias, y, bias)
    assert (out == y + bias).all() and out.dtype == dtype
    got_y, got_bias = jax.jit(vjp)(dy)
    assert (got_y == dy).all() and got_bias.dtype == dtype
    want = dy.astype(jnp.float32).sum((0, 1, 2))
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16 keeps 8 bits of the f32 sum
    assert _rel(got_bias.astype(jnp.float32), want) < tol
    # as a cohort takes it: each lane its own sum
    lanes = jax.vmap(jax.grad(lambda b, v: (add_bias(v, b) ** 2).sum()))(
        jnp.zeros((2, 3)), jnp.stack([y, -2 * y]).astype(jnp.float32))
    assert _rel(lanes, jnp.stack([2 * y, -4 * y]).astype(jnp.float32).sum((1, 2, 3))) < 1e-5


# Kernel shapes of the two models below (cnn6 and resnet6 on 8x8 images), so that the slow
# compilations of flax's own 4-d draws are shared between the two tests; a 3-d, a 5-d, a
# bfloat16, a float16 and two matrix cases; and sizes at, just past and well past the first
# draw size (4,096 numbers) and past the second (16,384).
@pytest.mark.parametrize("name, shape, dtype", [
    ("he_normal", (3, 3, 3, 8), jnp.float32), ("lecun_normal", (3, 3, 8, 16), jnp.float32),
    ("he_normal", (1, 1, 8, 16), jnp.float32), ("lecun_normal", (5, 4, 6), jnp.float32),
    ("he_normal", (2, 3, 3, 4, 5), jnp.float32), ("he_normal", (3, 3, 8, 8), jnp.bfloat16),
    ("lecun_normal", (64, 10), jnp.float32), ("lecun_normal", (64, 64), jnp.float32),
    ("he_normal", (4097, 1), jnp.float32), ("lecun_normal", (300, 70), jnp.float16)])
def test_quick_initialisers_give_flaxs_initial_values_bit_for_bit(name, shape, dtype):
    """The quick-to-compile initialisers (``fan_in_normal``: a draw of a few fixed sizes, cut
    and reshaped) give the very numbers of flax's own on the kernel's shape, so no parameter,
    checkpoint or recorded result changes."""
    from fdjax.core import layers

    key = jax.random.key(7)
    ours = getattr(layers, name)()(key, shape, dtype)
    theirs = getattr(nn.initializers, name)()(key, shape, dtype)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


def test_quick_initialisers_give_flaxs_values_at_xlas_default_level_too():
    """As above at XLA's default optimisation level, at which runs compile (this module runs
    at -O0: ``QUICK_COMPILE`` in ``tests/conftest.py``). Sizes that leave vector remainders
    of every length, in a draw of 4,096 or 16,384 numbers against one of the kernel's size."""
    from fdjax.core import layers

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()  # the in-memory caches do not tell the levels apart
    try:
        for shape in [(61, 7), (64, 64), (13, 11), (4097, 1), (127, 33)]:
            key = jax.random.key(sum(shape))
            ours = layers.he_normal()(key, shape)
            theirs = nn.initializers.he_normal()(key, shape)
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=shape)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
        jax.clear_caches()


@contextlib.contextmanager
def _compilations():
    """The names of the programs XLA compiled (or loaded from the persistent cache) meanwhile."""
    names, listening = [], [True]

    def listen(event, duration, fun_name=None, **_):
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            names.append(fun_name)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        listening[0] = False


def test_kernels_of_a_size_class_share_one_compiled_draw():
    """Kernels of five shapes whose sizes fall in one class (4,097 to 16,384 numbers) compile
    one draw between them, where drawing over each shape compiled five: the reason for
    ``fan_in_normal``. (float16, a dtype no other test draws in at that size.)"""
    from fdjax.core import layers

    init, key = layers.he_normal(), jax.random.key(1)
    shapes = [(3, 3, 30, 20), (3, 3, 40, 40), (70, 100), (5000, 2), (2, 9, 13, 31)]
    with _compilations() as names:
        kernels = [init(key, shape, jnp.float16) for shape in shapes]
    assert [k.shape for k in kernels] == shapes
    assert sum("truncated_normal" in str(n) for n in names) == 1, names
    with pytest.raises(ValueError, match="2 or more axes"):
        init(key, (5,))


@pytest.mark.parametrize("grads", ["pool", "xla"])  # layers.Conv and nn.Conv
def test_the_models_initial_values_are_those_of_flaxs_initialisers(grads, monkeypatch):
    """Every leaf of the CNN (``he_normal`` kernels) and of the ResNet (flax's default
    ``lecun_normal``, BatchNorm's statistics) as ``Model.init`` makes them (the quick
    initialisers, the forward pass traced lazily) is what flax's own initialisers give in a
    plain ``module.init`` on a dummy batch, bit for bit."""
    from fdjax.core import layers, resnet
    from fdjax.core.models import ModelSpec

    # At width 8 the ResNet's kernels are the CNN's four and one 1x1 shortcut: flax's draws
    # over each 4-d shape take seconds to compile, once per shape.
    key, images = jax.random.key(3), jnp.zeros((1, 8, 8, 3), jnp.uint8)
    cnn = make_model("cnn6", input_shape=(8, 8, 3), width=0.25, grads=grads)
    res = ModelSpec(resnet.resnet6(10, input_shape=(8, 8, 3), width=8), (8, 8, 3), 10).build()
    ours = [cnn.init(key), res.init(key)]
    monkeypatch.setattr(layers, "he_normal", nn.initializers.he_normal)
    monkeypatch.setattr(layers, "lecun_normal", nn.initializers.lecun_normal)
    monkeypatch.setattr(resnet, "lecun_normal", nn.initializers.lecun_normal)
    cnn = make_model("cnn6", input_shape=(8, 8, 3), width=0.25, grads=grads)
    res = resnet.resnet6(10, input_shape=(8, 8, 3), width=8)
    plain = [cnn.module.init(key, images, train=False), res.init(key, images, train=False)]
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(plain)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
