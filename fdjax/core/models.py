"""The CNN family of fdjax and the paper's two presets.

The paper names its models only by depth: a 12-layer CNN as the global model held by the
distillation server, and a 6-layer CNN as the distilled model the clients train. fdjax fixes them
as VGG-style stacks of 3x3 convolutions, so the pair differs by depth and width alone and
knowledge distillation moves between two models of the same family.

``cnn6`` (the distilled, client-side model), at width 1.0, 32x32x3 input::

    1  conv 3x3, 32 channels, ReLU
    2  conv 3x3, 32 channels, ReLU      -> max-pool 2x2
    3  conv 3x3, 64 channels, ReLU
    4  conv 3x3, 64 channels, ReLU      -> max-pool 2x2
       flatten
    5  dense 256, ReLU
    6  dense num_classes (logits)

``cnn12`` (the global, server-side model), at width 1.0::

    1  conv 3x3, 32 channels, ReLU
    2  conv 3x3, 32 channels, ReLU      -> max-pool 2x2
    3  conv 3x3, 64 channels, ReLU
    4  conv 3x3, 64 channels, ReLU      -> max-pool 2x2
    5  conv 3x3, 128 channels, ReLU
    6  conv 3x3, 128 channels, ReLU
    7  conv 3x3, 128 channels, ReLU     -> max-pool 2x2
    8  conv 3x3, 256 channels, ReLU
    9  conv 3x3, 256 channels, ReLU
    10 conv 3x3, 256 channels, ReLU     -> max-pool 2x2
       flatten
    11 dense 256, ReLU
    12 dense num_classes (logits)

A width multiplier scales every convolution's channels and the hidden dense layer (never the
logits); channel counts are rounded and kept at least 1. A pooling step is skipped once the feature
map is 1 pixel wide, so any input from 8x8 up works (an 8x8 input reaches 1x1 after three pools).
Convolutions use He-normal initialisation, which keeps a 12-layer ReLU stack trainable without
normalisation. ``norm="group"`` or ``"layer"`` adds a stateless normalisation after each convolution:
stateless so FedAvg needs no running statistics. Images arrive as uint8 and are scaled to [0, 1]
and centred inside the model, so every data source feeds the same pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.errors import LazyInitError

from fdjax.core import layers
from fdjax.core.layers import Conv, max_pool_2x2, resolve_grads

#: Convolution stages (channels per conv, one tuple per pooling stage) and hidden dense widths.
PRESETS: dict[str, dict[str, Any]] = {
    "cnn6": {"stages": ((32, 32), (64, 64)), "hidden": (256,)},
    "cnn12": {"stages": ((32, 32), (64, 64), (128, 128, 128), (256, 256, 256)), "hidden": (256,)},
}

NORMS = ("none", "group", "layer")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class CNN(nn.Module):
    """A VGG-style CNN: stages of 3x3 conv + ReLU, each followed by 2x2 max-pooling.

    Attributes:
        stages: channels of each convolution, grouped by pooling stage.
        hidden: widths of the hidden dense layers before the logits.
        num_classes: number of output logits.
        norm: "none", "group" (GroupNorm, up to 8 groups) or "layer" after each convolution.
        dtype: computation dtype (parameters stay float32).
        grads: "xla" (XLA's own gradients), "pool" (the max-pool's and the convolutions' bias
            gradients written out, ``fdjax.core.layers``: the same values, several times faster
            on XLA CPU) or "matmul" (the convolutions' weight gradients written out too); the
            forward pass is the same.
    """

    stages: Sequence[Sequence[int]]
    hidden: Sequence[int]
    num_classes: int
    norm: str = "none"
    dtype: Any = jnp.float32
    grads: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # deterministic and stateless: the same in training and evaluation
        x = images
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(self.dtype) / 255.0
        x = (x.astype(self.dtype) - 0.5) / 0.25
        for stage in self.stages:
            for channels in stage:
                x = self._conv(channels)(x)
                if self.norm == "group":
                    x = nn.GroupNorm(num_groups=_groups(channels), dtype=self.dtype)(x)
                elif self.norm == "layer":
                    x = nn.LayerNorm(dtype=self.dtype)(x)
                x = nn.relu(x)
            if x.shape[-2] >= 2 and x.shape[-3] >= 2:
                x = (max_pool_2x2(x) if self.grads in ("pool", "matmul")
                     else nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = x.reshape(x.shape[:-3] + (-1,))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=layers.he_normal())(x))
        # flax's default kernel initialiser (lecun_normal), drawn quick to compile
        return nn.Dense(self.num_classes, dtype=self.dtype,
                        kernel_init=layers.lecun_normal())(x).astype(jnp.float32)

    def _conv(self, channels: int) -> nn.Module:
        # Both layers are named Conv_<n> and hold the same parameters, so the choice of gradient
        # never changes a parameter tree, a checkpoint or an initial value.
        if self.grads in ("pool", "matmul"):
            return Conv(channels, (3, 3), dtype=self.dtype, kernel_init=layers.he_normal(),
                        kernel_grad="matmul" if self.grads == "matmul" else "xla")
        return nn.Conv(channels, (3, 3), padding="SAME", dtype=self.dtype,
                       kernel_init=layers.he_normal())


def _groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


#: Where ``Model.train_fn`` finds the dropout key: the rng stream Flax's ``nn.Dropout`` reads.
DROPOUT = "dropout"


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as the core sees it: any Flax module, its input shape and its class count.

    The module's ``__call__(images, *, train: bool)`` returns logits ``[batch, num_classes]``.
    Its variables (``init``) are the whole pytree the core passes around as "params": the
    ``params`` collection, which the optimizer trains, and any state collections (BatchNorm's
    ``batch_stats``), which training updates through Flax's ``mutable`` and which FedAvg,
    distillation and checkpoints carry like any other leaf.

    Attributes:
        name: preset name (``"cnn6"``), import path or the module's class name.
        module: the Flax module.
        input_shape: one example's shape, (height, width, channels).
        num_classes: number of logits.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def apply_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
        """``(variables, images) -> logits`` in evaluation mode (``train=False``): no dropout,
        BatchNorm's running statistics. Teachers and evaluation use it."""
        return functools.partial(_evaluate_apply, self.module)

    @property
    def train_fn(self) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]:
        """``(variables, images, key) -> (logits, state)`` in training mode (``train=True``).

        ``key`` is the step's key, given to the ``dropout`` rng stream; ``state`` holds the
        updated state collections (``batch_stats``), empty for a stateless model.
        """
        return functools.partial(_train_apply, self.module)

    def init(self, key: jax.Array) -> Any:
        """Fresh variables for this model, from ``key`` (evaluation mode, so no dropout key).

        The forward pass is traced on the input's shape, not run (flax's ``lazy_init``): only
        the initialisers compute. The values are those of ``module.init`` on a dummy batch, but
        run eagerly that forward pass compiles each layer's operations one by one, once per
        shape and process (``cnn12`` at width 0.25: 11.4 s to initialise in a fresh process,
        6.4 s lazily, beside other work). A module whose variables depend on the input's values
        (which ``lazy_init`` refuses) is initialised on the dummy batch as before."""
        shape = (1,) + tuple(self.input_shape)
        try:
            return self.module.lazy_init(key, jax.ShapeDtypeStruct(shape, jnp.uint8), train=False)
        except LazyInitError:
            return self.module.init(key, jnp.zeros(shape, jnp.uint8), train=False)


def _evaluate_apply(module: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    return module.apply(variables, images, train=False)


def _train_apply(module: nn.Module, variables: Any, images: jax.Array, key: jax.Array
                 ) -> tuple[jax.Array, Any]:
    state = [name for name in variables if name != "params"]
    if not state:
        return module.apply(variables, images, train=True, rngs={DROPOUT: key}), {}
    return module.apply(variables, images, train=True, rngs={DROPOUT: key}, mutable=state)


def make_model(preset: str, *, input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
               width: float = 1.0, norm: str = "none", dtype: Any = jnp.float32,
               grads: str = "auto") -> Model:
    """Builds a preset of the CNN family.

    Args:
        preset: ``"cnn6"`` (distilled model) or ``"cnn12"`` (global model).
        input_shape: (height, width, channels) of one image; height and width at least 8.
        num_classes: number of classes, at least 2.
        width: multiplier of every conv's channels and of the hidden dense layer; > 0.
        norm: "none", "group" or "layer".
        dtype: computation dtype.
        grads: how gradients are computed: "auto" (the default: "pool" where JAX's default
            backend is the CPU, where it trains faster, "xla" elsewhere), "xla", "pool" or
            "matmul" (see ``fdjax.core.layers``). Parameters and forward values do not depend on it.

    Raises:
        ValueError: for an unknown preset or norm, or an input, class count or width out of range.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[0] < 8 or shape[1] < 8 or shape[2] < 1:
        raise ValueError(f"input_shape must be (height, width, channels) with height and width >= 8 "
                         f"and channels >= 1, got {tuple(input_shape)}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    grads = resolve_grads(grads)
    spec = PRESETS[preset]
    module = CNN(
        stages=tuple(tuple(_scaled(c, width) for c in stage) for stage in spec["stages"]),
        hidden=tuple(_scaled(h, width) for h in spec["hidden"]),
        num_classes=int(num_classes), norm=norm, dtype=dtype, grads=grads)
    return Model(preset, module, shape, int(num_classes))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


class ModelError(ValueError):
    """A model that cannot be built: an import path that does not import, a factory that does
    not return a Flax module, or a module whose logits have the wrong shape. The message names
    the setting (``models.global_model``, say) and fits on one line."""


#: What a model setting says when the module came from Python (``fdjax.run(..., models=...)``)
#: as an object no import path names: such a run cannot be rebuilt from its ``config.toml``.
CALLER = "caller"


def import_factory(path: str, key: str = "model") -> Callable[..., Any]:
    """The object ``"package.module:attribute"`` names (``attribute`` may be dotted).

    Raises:
        ModelError: naming ``key``, when the path is malformed or does not import.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelError(f"{key}: {path!r} is not an import path; write 'package.module:factory'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises while importing
        raise ModelError(f"{key}: cannot import {module_name!r} ({type(err).__name__}: "
                         f"{_first_line(err)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{key}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    return target


def import_path(obj: Any) -> str | None:
    """``"module:qualname"`` of a module-level function or class that imports back to ``obj``
    (so a run handed it from Python can record it and be resumed from its config); else None."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or "<" in name or module == "__main__":
        return None
    try:
        return f"{module}:{name}" if import_factory(f"{module}:{name}") is obj else None
    except ModelError:
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a model is built from; hashable, so built models and programs are shared.

    Attributes:
        source: a preset name (``"cnn6"``, ``"cnn12"``), an import path
            ``"package.module:factory"``, a factory or a ``flax.linen.Module``. A factory is
            called as ``factory(num_classes=..., input_shape=...)`` and returns the module.
        input_shape: one example's shape, (height, width, channels).
        num_classes: number of logits.
        width, norm, grads: the presets' settings (see ``make_model``); unused by other sources.
        key: the setting the model comes from, named by every error.
    """

    source: Any
    input_shape: tuple[int, ...]
    num_classes: int
    width: float = 1.0
    norm: str = "none"
    grads: str = "auto"
    key: str = dataclasses.field(default="model", compare=False)

    def build(self) -> Model:
        """The model, checked on one example: its logits must be ``[1, num_classes]``.

        Raises:
            ModelError: naming ``key``, for a factory that does not import or does not return
                a module, or a module that fails on one example or gives logits of another shape.
        """
        if isinstance(self.source, str) and self.source in PRESETS:
            return make_model(self.source, input_shape=self.input_shape,
                              num_classes=self.num_classes, width=self.width, norm=self.norm,
                              grads=self.grads)
        module, name = self._module()
        model = Model(name, module, tuple(int(s) for s in self.input_shape), int(self.num_classes))
        _check_logits(model, self.key)
        return model

    def _module(self) -> tuple[nn.Module, str]:
        source, name = self.source, getattr(self.source, "__name__", type(self.source).__name__)
        if isinstance(source, str):
            source, name = import_factory(source, self.key), source
        if not isinstance(source, nn.Module):
            if not callable(source):
                raise ModelError(f"{self.key}: {name} is neither a flax.linen.Module nor a "
                                 f"factory that returns one")
            try:
                source = source(num_classes=int(self.num_classes),
                                input_shape=tuple(int(s) for s in self.input_shape))
            except Exception as err:
                raise ModelError(f"{self.key}: {name}(num_classes=..., input_shape=...) raised "
                                 f"{type(err).__name__}: {_first_line(err)}") from None
            if not isinstance(source, nn.Module):
                raise ModelError(f"{self.key}: {name} returned a {type(source).__name__}, not a "
                                 f"flax.linen.Module")
        return source, name


def _check_logits(model: Model, key: str) -> None:
    """Traces (never runs) init and both modes on one example and checks the logits' shape."""
    dummy = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.uint8)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    try:
        variables = jax.eval_shape(model.init, rng)
        shapes = [jax.eval_shape(model.apply_fn, variables, dummy),
                  jax.eval_shape(model.train_fn, variables, dummy, rng)[0]]
    except Exception as err:
        raise ModelError(f"{key}: {model.name} fails on one {tuple(model.input_shape)} image "
                         f"with train=False/True ({type(err).__name__}: {_first_line(err)})"
                         ) from None
    want = (1, model.num_classes)
    for logits in shapes:
        if getattr(logits, "shape", None) != want:
            got = getattr(logits, "shape", type(logits).__name__)
            raise ModelError(f"{key}: {model.name} gives logits of shape {got} for one "
                             f"{tuple(model.input_shape)} image; expected {want}")
