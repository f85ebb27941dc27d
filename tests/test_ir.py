"""The IR: JSON round trip, structural hash, refusals, and the printed form (golden)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.ir import (
    Const,
    DTypeArg,
    EllipsisArg,
    ListArg,
    Op,
    Program,
    Ref,
    ScalarType,
    Site,
    SliceArg,
    Span,
    TensorType,
    TupleArg,
    TupleType,
    dumps,
    from_json,
    loads,
    to_json,
)
from compiler.printer import format_program
from interp_dsl import NNsight

# ------------------------------------------------------------------------------ generated IR
spans = st.builds(Span, st.sampled_from(["a.py", "exp.ivx"]), st.integers(1, 500), st.integers(0, 80))
sites = st.builds(Site, st.sampled_from(["", "layer1", "model.layers.3", "lm_head"]),
                  st.sampled_from(["output", "input", "inputs"]), st.integers(0, 3), st.just(0))
tensor_types = st.builds(TensorType, st.sampled_from(["float32", "int64", "bfloat16"]),
                         st.lists(st.one_of(st.integers(0, 64), st.sampled_from(["batch", "seq"])),
                                  max_size=4).map(tuple))


def consts():
    return st.one_of(st.integers(-5, 5).map(Const), st.none().map(Const), st.booleans().map(Const),
                     st.sampled_from(["x", "b s d"]).map(Const), st.just(EllipsisArg()),
                     st.sampled_from(["float32", "int64"]).map(DTypeArg))


def args_over(ids: list[int]):
    leaf = st.one_of(consts(), st.sampled_from(ids).map(Ref)) if ids else consts()
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: TupleArg(tuple(xs))),
        st.lists(inner, max_size=3).map(lambda xs: ListArg(tuple(xs))),
        st.builds(SliceArg, inner, inner, inner)), max_leaves=6)


@st.composite
def programs(draw):
    ops: list[Op] = []
    ids: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["read", "call", "param", "write", "save", "module"]))
        span = draw(spans)
        if kind == "read":
            ops.append(Op("read", len(ops), site=draw(sites), span=span))
        elif kind == "param":
            ops.append(Op("param", len(ops), target=f"p{len(ops)}", type=draw(tensor_types), span=span))
        elif kind in ("call", "module"):
            args = tuple(draw(st.lists(args_over(ids), max_size=3)))
            target = draw(st.sampled_from(["add", "torch.softmax", "getitem"])) if kind == "call" else "lm_head"
            names = {"add": [], "getitem": [], "torch.softmax": ["dim", "dtype"]}.get(target, ["k0", "k1"])
            kwargs = tuple(zip(names, draw(st.lists(args_over(ids), max_size=len(names))), strict=False))
            ops.append(Op(kind, len(ops), target=target, args=args, kwargs=kwargs, span=span))
        elif kind == "write" and ids:
            path = tuple(draw(st.lists(args_over(ids), max_size=2)))
            ops.append(Op("write", site=draw(sites), path=path, args=(Ref(draw(st.sampled_from(ids))),), span=span))
        elif kind == "save" and ids:
            ops.append(Op("save", target=f"s{len(ops)}", args=(Ref(draw(st.sampled_from(ids))),), span=span))
        if ops and ops[-1].result is not None and ops[-1].result not in ids:
            ids.append(ops[-1].result)
    return Program(tuple(ops), n_invokes=1)


@settings(max_examples=200, deadline=None)
@given(programs())
def test_json_round_trip(program):
    assert loads(dumps(program)) == program
    assert from_json(json.loads(json.dumps(to_json(program)))).ops == program.ops
    assert [op.span for op in loads(dumps(program)).ops] == [op.span for op in program.ops]


@settings(max_examples=200, deadline=None)
@given(programs(), spans)
def test_hash_is_stable_and_ignores_spans(program, span):
    moved = Program(tuple(Op(**{**{f: getattr(op, f) for f in op.__dataclass_fields__}, "span": span})
                          for op in program.ops), program.n_invokes)
    assert moved == program
    assert moved.structural_hash() == program.structural_hash() == loads(dumps(program)).structural_hash()


def test_hash_changes_with_structure():
    a = Program((Op("read", 0, site=Site("layer1", "output")), Op("save", target="s", args=(Ref(0),))))
    b = Program((Op("read", 0, site=Site("layer2", "output")), Op("save", target="s", args=(Ref(0),))))
    assert a.structural_hash() != b.structural_hash()


def test_param_type_is_in_the_hash():
    def prog(shape):
        return Program((Op("param", 0, target="v", type=TensorType("float32", shape)),))
    assert prog((576,)).structural_hash() != prog((64,)).structural_hash()


@pytest.mark.parametrize("make, message", [
    (lambda: Op("read", 0), "needs site"),
    (lambda: Op("save", 1, target="x", args=(Ref(0),)), "defines no value"),
    (lambda: Op("frobnicate", 0), "unknown opcode"),
    (lambda: Op("param", 0, target="p"), "declares its type"),
    (lambda: Site("m", "outputs"), "site kind"),
    (lambda: Const(1.5), "Const holds"),
    (lambda: ScalarType("complex"), "unknown scalar"),
    (lambda: TensorType("float32", (1.5,)), "tensor dims"),
    (lambda: Program((Op("save", target="s", args=(Ref(3),)),)), "before it is defined"),
    (lambda: Program((Op("read", 0, site=Site("m", "output", invoke=1)),)), "names invoke 1"),
])
def test_constructors_refuse_nonsense(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_loads_refuses_unknown_records():
    with pytest.raises(ValueError, match="not a Program record"):
        loads('{"$": "Pickle", "x": 1}')
    with pytest.raises(ValueError, match="op 0: unknown IR record 'Pickle'"):
        loads('{"$": "Program", "ops": [{"$": "Pickle"}]}')


def test_printed_program_golden(net):
    tiny = NNsight(net)
    with tiny.trace(torch.rand(1, 5)) as tracer:
        h = tiny.layer1.output
        tiny.layer1.output[:, 0] = 0
        (h * 0.5).softmax(dim=-1).save()
        tiny.layer2.input.save()
    assert format_program(tracer.program()) == GOLDEN


GOLDEN = """\
program v1 invokes=1
  %0 = read layer1.output@0
  write layer1.output@0[:, 0] <- 0
  %1 = param 'p0': float
  %2 = mul(%0, %1)
  %3 = Tensor.softmax(%2, dim=-1)
  save %3 as 'save0'
  %4 = read layer2.input@0
  save %4 as 'save1'"""


def test_typed_printing_shows_types(net):
    tiny = NNsight(net)
    with tiny.trace(torch.rand(1, 5)) as tracer:
        tiny.layer2.output.sum().save()
    typed = tracer.typed
    text = format_program(typed.program, typed.types)
    assert "%0 = read layer2.output@0 : f32[1, 2]" in text
    assert "%1 = Tensor.sum(%0) : f32[]" in text


def test_tuple_types_print():
    from compiler.printer import format_type
    assert format_type(TupleType((TensorType("float32", ("batch", 8)),))) == "(f32[batch, 8],)"
