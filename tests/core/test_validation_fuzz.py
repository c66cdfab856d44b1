"""Fuzzing the update validator: no malformed update is accepted, no valid one is rejected.

Hypothesis draws a random model (nested dicts of arrays of random shapes and dtypes), then either a
valid update of it (same structure, shapes and dtypes, finite values, a change within the norm
bound; numpy or jax arrays) or one of many kinds of malformed update. The validator must answer
``None`` for every valid update and a one-line reason for every malformed one, and never raise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.core.aggregation import validate_update

BOUND = 10.0
FLOATS = [np.float32, np.float16, np.float64]
NAMES = st.text("abcdefgh_0123", min_size=1, max_size=6)
SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def models(draw, depth=0):
    """A nested dict of arrays: the reference model."""
    keys = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    tree = {}
    for key in keys:
        if depth < 2 and draw(st.booleans()):
            tree[key] = draw(models(depth + 1))
        else:
            dtype = draw(st.sampled_from(FLOATS + [np.int32]))
            shape = draw(SHAPES)
            tree[key] = np.asarray(draw(st.integers(-3, 3)), dtype) + np.zeros(shape, dtype)
    return tree


def leaf_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


def copy(tree):
    return {k: copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def put(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    if value is _DELETE:
        del tree[path[-1]]
    else:
        tree[path[-1]] = value


_DELETE = object()


@st.composite
def valid_updates(draw, reference):
    """Same structure, shapes and dtypes, finite values, total change below the bound."""
    update = copy(reference)
    paths = list(leaf_paths(reference))
    budget = BOUND / 2 / max(1, len(paths))
    as_jax = draw(st.booleans())
    for path in paths:
        ref = get(reference, path)
        if np.issubdtype(ref.dtype, np.floating):
            step = draw(st.floats(-1, 1)) * budget / max(1, np.sqrt(ref.size))
            value = (ref.astype(np.float64) + step).astype(ref.dtype)
        else:
            value = ref.copy()
        put(update, path, jnp.asarray(value) if as_jax and ref.dtype != np.float64 else value)
    return update


KINDS = ["drop", "add", "rename", "shape", "dtype", "nan", "inf", "non_array", "container",
         "norm", "not_a_tree", "nested"]


@st.composite
def malformed_updates(draw, reference):
    """A valid update with one thing broken; returns (kind, update)."""
    kind = draw(st.sampled_from(KINDS))
    update = draw(valid_updates(reference))
    paths = list(leaf_paths(reference))
    path = draw(st.sampled_from(paths))
    ref = get(reference, path)
    if kind == "drop":
        put(update, path, _DELETE)
    elif kind == "add":
        put(update, path[:-1] + (path[-1] + "_extra",), np.zeros(2, np.float32))
    elif kind == "rename":
        value = get(update, path)
        put(update, path, _DELETE)
        put(update, path[:-1] + (path[-1] + "X",), value)
    elif kind == "shape":
        shape = draw(SHAPES.filter(lambda s: s != ref.shape))
        put(update, path, np.zeros(shape, ref.dtype))
    elif kind == "dtype":
        dtype = draw(st.sampled_from([d for d in FLOATS + [np.int32, np.int64, np.bool_,
                                                           np.complex64] if d != ref.dtype]))
        put(update, path, np.zeros(ref.shape, dtype))
    elif kind in ("nan", "inf"):
        floats = [p for p in paths if np.issubdtype(get(reference, p).dtype, np.floating)]
        if not floats:
            kind = "drop"
            put(update, path, _DELETE)
        else:
            path = draw(st.sampled_from(floats))
            value = np.array(get(update, path), copy=True)
            flat = value.reshape(-1)
            bad = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
            flat[draw(st.integers(0, flat.size - 1))] = bad
            put(update, path, value)
    elif kind == "non_array":
        put(update, path, draw(st.sampled_from(
            [1.5, "0, 0", b"\x00", object(), ref.tolist() if ref.ndim else [0.0]])))
    elif kind == "container":
        parent = get(update, path[:-1]) if len(path) > 1 else update
        values = list(parent.values())
        replacement = draw(st.sampled_from([tuple, list]))(values)
        if len(path) > 1:
            put(update, path[:-1], replacement)
        else:
            update = replacement
    elif kind == "norm":
        value = np.asarray(get(update, path), np.float64) + 2 * BOUND
        put(update, path, value.astype(ref.dtype))
    elif kind == "not_a_tree":
        update = draw(st.sampled_from([None, 3, "model", object(), [], {}]))
    elif kind == "nested":
        put(update, path, {"inner": np.zeros(ref.shape, ref.dtype)})
    return kind, update


@settings(deadline=None, max_examples=150)
@given(st.data())
def test_valid_updates_are_never_rejected(data):
    reference = data.draw(models())
    update = data.draw(valid_updates(reference))
    assert validate_update(reference, update, max_delta_norm=BOUND) is None
    assert validate_update(reference, update) is None


@settings(deadline=None, max_examples=400)
@given(st.data())
def test_malformed_updates_are_never_accepted(data):
    reference = data.draw(models())
    kind, update = data.draw(malformed_updates(reference))
    reason = validate_update(reference, update, max_delta_norm=BOUND)
    assert isinstance(reason, str) and reason and "\n" not in reason, (kind, reason)
    if kind != "norm":  # every other kind is malformed whatever the bound
        assert validate_update(reference, update) is not None, kind


def test_a_hostile_leaf_that_raises_on_inspection_is_rejected_not_raised():
    class Hostile(np.ndarray):
        @property
        def dtype(self):
            raise RuntimeError("boom\nsecond line")

    reference = {"w": np.zeros(3, np.float32)}
    reason = validate_update(reference, {"w": np.zeros(3, np.float32).view(Hostile)})
    assert reason is not None and "boom" in reason and "\n" not in reason


def test_a_jax_typed_key_is_not_a_parameter():
    reference = {"w": jnp.zeros(2, jnp.uint32)}
    assert validate_update(reference, {"w": jax.random.key(0)}) is not None
