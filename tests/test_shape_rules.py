"""Every shape rule agrees with torch: on generated inputs a rule gives exactly torch's shape and
dtype, or declines (None) and leaves the case to fake tensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import ops
from compiler.shape_rules import RULES, Abstract, infer

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])


def tensor(shape, dtype):
    return torch.zeros(shape, dtype=dtype) if dtype != torch.bool else torch.zeros(shape, dtype=torch.bool)


def index_items(ndim):
    item = st.one_of(st.integers(-6, 6), st.none(), st.just(Ellipsis),
                     st.builds(slice, st.none() | st.integers(-7, 7), st.none() | st.integers(-7, 7),
                               st.none() | st.integers(-2, 3)),
                     st.just([0, 1]))
    return st.one_of(item, st.lists(item, max_size=ndim + 1).map(tuple))


def agree(name, args, kwargs):
    abstract = [Abstract(a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    rule = infer(name, abstract, kwargs)
    try:
        real = ops.call(name, args, kwargs)
    except Exception:
        assert rule is None, (name, args, kwargs)
        return
    if rule is not None:
        assert (rule.shape, rule.dtype) == (real.shape, real.dtype), (name, rule, real.shape, real.dtype)


@settings(max_examples=400, deadline=None)
@given(shapes, dtypes, st.data())
def test_getitem(shape, dtype, data):
    agree("getitem", [tensor(shape, dtype), data.draw(index_items(len(shape)))], {})


@settings(max_examples=400, deadline=None)
@given(shapes, shapes, dtypes, dtypes, st.sampled_from(["add", "sub", "mul", "truediv", "eq", "lt", "ge"]),
       st.sampled_from(["tensor", "int", "float", "bool"]))
def test_elementwise(a, b, da, db, name, other):
    right = {"tensor": tensor(b, db), "int": 3, "float": 0.5, "bool": True}[other]
    agree(name, [tensor(a, da), right], {})
    agree(name, [right, tensor(a, da)], {})


@settings(max_examples=300, deadline=None)
@given(shapes, dtypes, st.sampled_from(["Tensor.sum", "Tensor.mean", "Tensor.norm", "torch.sum",
                                        "Tensor.amax", "torch.mean"]),
       st.one_of(st.none(), st.integers(-5, 4), st.lists(st.integers(-4, 3), max_size=3).map(tuple)),
       st.booleans(), st.booleans())
def test_reductions(shape, dtype, name, dim, keepdim, positional):
    x = tensor(shape, dtype)
    if dim is None:
        agree(name, [x], {"keepdim": keepdim})
    elif positional and name != "Tensor.norm":
        agree(name, [x, dim], {"keepdim": keepdim})
    else:
        agree(name, [x], {"dim": dim, "keepdim": keepdim})


@settings(max_examples=200, deadline=None)
@given(shapes, dtypes, st.integers(-5, 4), st.sampled_from(["torch.softmax", "Tensor.softmax",
                                                             "torch.nn.functional.log_softmax"]))
def test_softmax(shape, dtype, dim, name):
    agree(name, [tensor(shape, dtype)], {"dim": dim})


@settings(max_examples=200, deadline=None)
@given(shapes, dtypes, st.integers(-5, 4), st.integers(-5, 4), dtypes)
def test_transpose_to_and_unary(shape, dtype, a, b, target):
    x = tensor(shape, dtype)
    agree("Tensor.transpose", [x, a, b], {})
    agree("Tensor.to", [x, target], {})
    for name in ("neg", "Tensor.clone", "Tensor.abs", "torch.relu", "Tensor.detach"):
        agree(name, [x], {})


def _common_cases() -> dict[str, tuple[list, dict]]:
    """One everyday call per rule: each must be answered by its rule, not left to fake tensors."""
    x, row, ints = torch.rand(2, 3, 4), torch.rand(4), torch.zeros(2, 3, dtype=torch.int64)
    cases: dict[str, tuple[list, dict]] = {"getitem": ([x, (slice(None), -1)], {})}
    cases.update({op: ([x, row], {}) for op in ("add", "sub", "mul", "truediv", "eq", "lt", "ge", "ne", "le", "gt")})
    cases.update({name: ([x], {"dim": -1, "keepdim": False}) for name in
                  ("Tensor.sum", "Tensor.mean", "Tensor.norm", "torch.sum", "Tensor.amax", "torch.mean", "Tensor.amin")})
    cases.update({name: ([x], {"dim": -1}) for name in
                  ("torch.softmax", "Tensor.softmax", "torch.nn.functional.log_softmax", "torch.log_softmax",
                   "Tensor.log_softmax", "torch.nn.functional.softmax")})
    cases.update({name: ([x, 0, 2], {}) for name in ("Tensor.transpose", "torch.transpose")})
    cases["Tensor.to"] = ([ints, torch.float16], {})
    cases.update({name: ([x], {}) for name in ("neg", "pos", "Tensor.clone", "Tensor.contiguous", "Tensor.detach",
                                               "Tensor.abs", "torch.abs", "Tensor.relu", "torch.relu")})
    return cases


def test_every_rule_answers_its_common_case():
    """The property tests above accept a rule that declines; here every rule must answer."""
    cases = _common_cases()
    assert set(cases) == set(RULES)
    for name, (args, kwargs) in cases.items():
        abstract = [Abstract(a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        rule, real = infer(name, abstract, kwargs), ops.call(name, args, kwargs)
        assert rule is not None, f"{name} declined {args} {kwargs}"
        assert (rule.shape, rule.dtype) == (real.shape, real.dtype), name
