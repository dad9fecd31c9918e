"""Reproducers of bugs found by adversarial calls of the single-process API.

Each test failed before the fix it comes with.
"""

import numpy as np
import pytest

import pyconvmpi as pcm


@pytest.mark.parametrize(
    "input_shape,exc,words",
    [
        ((1, 1, -4, 4), ValueError, ["input_shape", "non-negative", "-4"]),
        ((1.5, 1, 4, 4), TypeError, ["input_shape", "integers", "1.5"]),
        ((1, 1, "a", 4), TypeError, ["input_shape", "integers", "'a'"]),
        (5, TypeError, ["input_shape", "sequence", "5"]),
        ((1, 1, True, 4), TypeError, ["input_shape", "integers", "True"]),
    ],
    ids=["negative", "float", "string", "int", "bool"],
)
def test_plan_rejects_bad_shape_entries(input_shape, exc, words):
    """plan() took a negative height into the geometry, truncated 1.5 to 1, and let int()
    and tuple() raise their own messages without the function or argument name."""
    with pytest.raises(exc) as info:
        pcm.plan(input_shape, (1, 1, 3, 3))
    message = str(info.value)
    assert message.startswith("plan: "), message
    for word in words:
        assert word in message, message


def test_plan_rejects_bad_weight_shape():
    with pytest.raises(ValueError, match=r"plan: weight_shape must contain non-negative .*-3"):
        pcm.plan((1, 1, 4, 4), (1, 1, -3, 3))


def test_plan_accepts_numpy_integer_shapes():
    shape = np.array([2, 3, 8, 8])
    got = pcm.plan(tuple(shape), np.array([4, 3, 3, 3]), padding=1)
    assert got == pcm.plan((2, 3, 8, 8), (4, 3, 3, 3), padding=1)


def test_plan_fields_accept_numpy_integers():
    """Plan(threads=np.int64(2)) raised 'threads must be a non-negative integer; got 2'."""
    plan = pcm.Plan(strategy="hybrid", threads=np.int64(2), active_ranks=np.int32(1),
                    grid=[np.int64(1), 1])
    assert plan.threads == 2
    assert type(plan.threads) is int
    assert type(plan.active_ranks) is int
    assert plan.grid == (1, 1)
    assert all(type(v) is int for v in plan.grid)


@pytest.mark.parametrize(
    "fields,words",
    [
        (dict(threads=2.0), ["threads", "non-negative integer", "2.0"]),
        (dict(threads=True), ["threads", "non-negative integer", "True"]),
        (dict(grid=(1, 1, 1)), ["grid", "pair", "(1, 1, 1)"]),
        (dict(grid=(1.0, 1)), ["grid", "pair", "1.0"]),
    ],
    ids=["float", "bool", "triple", "float-grid"],
)
def test_plan_fields_still_reject_non_integers(fields, words):
    with pytest.raises(ValueError) as info:
        pcm.Plan(**fields)
    for word in words:
        assert word in str(info.value)


def test_numpy_integer_plan_runs_conv2d():
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    w = np.random.default_rng(4).standard_normal((4, 3, 3, 3))
    plan = pcm.Plan(threads=np.int64(1), algorithm="reference")
    np.testing.assert_allclose(pcm.conv2d(x, w, plan=plan), pcm.conv2d(x, w), rtol=1e-12,
                               atol=1e-12)
