"""Hostile specs and payloads: nothing outside the vocabulary is reached, nothing is run, written
or allocated by a check, and in-place ops change the forward only as writes in the IR."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import vocabulary
from compiler.check import check
from compiler.errors import CheckError, ExecutionError, UnsupportedOperationError
from compiler.ir import dumps, loads
from compiler.signatures import record_sites
from compiler.validate import PayloadError
from interp_dsl import NNsight
from interp_dsl.cli import main
from runtime.interpreter import Batch, run

ROOT = Path(__file__).resolve().parent.parent


class Reached(BaseException):
    """A sentinel was called: a hostile input reached something outside the vocabulary."""


def _trip(*args, **kwargs):
    raise Reached(args[:1])


@pytest.fixture
def armed(monkeypatch, tmp_path_factory):
    """A context in which process, shell and deletion entry points, and opening a file to write,
    raise `Reached` (a BaseException: no `except Exception` of ours swallows it); interp_dsl's
    cache, in a directory of its own, may be written. `armed(no_files=True)`: no file opens at all."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("INTERP_DSL_CACHE", str(cache))
    real_open, real_unlink = builtins.open, os.unlink

    def ours(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and str(path).startswith(str(cache))

    def open_to_read(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not ours(file):
            raise Reached((file, mode))
        return real_open(file, mode, *args, **kwargs)

    def unlink_cache(path, *args, **kwargs):
        if not ours(path):
            raise Reached((path,))
        return real_unlink(path, *args, **kwargs)

    @contextlib.contextmanager
    def arm(no_files: bool = False):
        with contextlib.ExitStack() as stack:
            for owner, name in ((os, "system"), (os, "popen"), (os, "kill"), (os, "remove"), (os, "execv"),
                                (os, "execve"), (subprocess, "Popen"), (subprocess, "run"), (shutil, "rmtree")):
                stack.enter_context(mock.patch.object(owner, name, _trip))
            stack.enter_context(mock.patch.object(os, "unlink", unlink_cache))
            for owner in (builtins, io):
                stack.enter_context(mock.patch.object(owner, "open", _trip if no_files else open_to_read))
            yield
    return arm


def check_spec(tmp_path, tiny_dir, body: str, armed=contextlib.nullcontext) -> tuple[int, str]:
    """`ivx check` on an experiment holding `body`, inside `armed()`."""
    path = tmp_path / "exp.ivx"
    path.write_text(f'model "{tiny_dir}"\nprompt p = "the eiffel tower"\ninvoke p {{\n{body}\n}}\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), armed():
        code = main(["check", str(path)])
    return code, out.getvalue()


# ------------------------------------------------------------------------------ hostile .ivx
HOSTILE_SPECS = [
    ('  let g = model.__class__.__init__.__globals__\n  let s = g["__builtins__"]["__import__"]("os").system("touch PWNED")',
     "exp.ivx:4:", "private and special names are not part of the language"),
    ('  let t = model.tokenizer.save_pretrained("stolen")', "exp.ivx:4:",
     "model (LlamaForCausalLM) has no submodule, parameter or site 'tokenizer'"),
    ("  let f = model.model.layers[0].forward", "exp.ivx:4:", "has no submodule, parameter or site 'forward'"),
    ("  let h = model.model.layers[0].output._tracer", "exp.ivx:4:", "private and special names"),
    ("  let h = model.model.layers[0].output.data_ptr()", "exp.ivx:4:", "not in interp_dsl's vocabulary"),
    ('  let x = torch.load("weights.pt")', "exp.ivx:4:", "unknown function 'torch.load'"),
    ("  let x = F.relu(model.model.layers[0].output, out=model.model.layers[1].output)", "exp.ivx:4:",
     "`out=` is not allowed"),
    ("  let n = 2 ** 10 ** 10", "exp.ivx:4:", "is too large"),
    ('  let s = "a" * 1000000000', "exp.ivx:4:", "arithmetic is on numbers and tensors"),
    ("  let n = (2 ** 40) * (2 ** 40)", "exp.ivx:4:", "outside int64"),
    ("  let w = model.lm_head.weight.add_(1.0)", "exp.ivx:4:", "would change a weight of the model"),
    ("  let d = model.model.layers[0].output.shape.count(1)", "exp.ivx:4:", "a shape has no attribute 'count'"),
    ("  let d = (3).bit_length()", "exp.ivx:4:", "a number has no attribute 'bit_length'"),
]


@pytest.mark.parametrize("body, where, message", HOSTILE_SPECS, ids=range(len(HOSTILE_SPECS)))
def test_hostile_spec_is_refused_at_its_line(body, where, message, tmp_path, tiny_dir, armed, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = check_spec(tmp_path, tiny_dir, body, armed)
    assert code == 1, out
    assert where in out and message in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.ivx"]  # nothing written


def test_check_types_factories_without_allocating(tmp_path, tiny_dir, monkeypatch):
    """`torch.ones(1500000000)` would take 6 GB: a check types it on fake tensors."""
    monkeypatch.chdir(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out = check_spec(tmp_path, tiny_dir, "  save big = torch.ones(1500000000) + torch.zeros(1500000000)\n"
                                               "  save huge = torch.zeros(1000000000000)")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert code == 0, out
    assert grown_kib < 512 * 1024


def test_a_run_refuses_one_op_above_the_allocation_limit(net, monkeypatch):
    monkeypatch.setenv("IVX_MAX_OP_BYTES", str(2**20))
    model = NNsight(net)
    with pytest.raises(CheckError, match=r"Tensor.repeat would allocate 3.8 MiB \(f32\[1, 1000000\]\), "
                                         r"above the limit of 1.0 MiB") as e:
        with model.trace(torch.rand(1, 5)):
            model.layer1.output.repeat(1, 100000).sum().save()
    assert "test_hostile.py" in str(e.value)


# --------------------------------------------------------------------------- hostile payloads
def _payload(*ops: dict) -> str:
    return json.dumps({"$": "Program", "ops": list(ops), "n_invokes": 1, "version": 1})


def _op(opcode: str, result: int | None = 0, target: str = "", args=(), kwargs=(), **extra) -> dict:
    return {"$": "Op", "opcode": opcode, "result": result, "target": target, "args": list(args),
            "kwargs": [list(kv) for kv in kwargs], "path": [], "site": None, "type": None, **extra}


def _generating(*ops: dict) -> str:
    return json.dumps({"$": "Program", "ops": list(ops), "n_invokes": 1, "version": 1,
                       "generation": {"$": "Generation", "max_new_tokens": 4}})


def _c(value) -> dict:
    return {"$": "Const", "value": value}


READ = _op("read", 0, site={"$": "Site", "module": "layer1", "kind": "output", "call": 0, "invoke": 0})
HOSTILE_PAYLOADS = [
    (_payload(READ, _op("call", 1, "getattr", [{"$": "Ref", "id": 0}, _c("__class__")])),
     "op 1 (call getattr): 'getattr' is not in the vocabulary"),
    (_payload(_op("call", 0, "os.system", [_c("touch PWNED")])), "op 0 (call os.system): 'os.system' is not in"),
    (_payload(_op("call", 0, "builtins.eval", [_c("1")])), "'builtins.eval' is not in the vocabulary"),
    (_payload(READ, _op("call", 1, "torch.nn.functional.triplet_margin_with_distance_loss",
                        [{"$": "Ref", "id": 0}] * 3, [("distance_function", _c("x"))])), "is not in the vocabulary"),
    (_payload(READ, _op("call", 1, "einops.reduce", [{"$": "Ref", "id": 0}, _c("a b -> a"), _c("os.getcwd")])),
     "einops.reduce takes one of min, max"),
    (_payload(READ, _op("call", 1, "torch.mul", [{"$": "Ref", "id": 0}, _c(0)], [("out", {"$": "Ref", "id": 0})])),
     "`out=` is not allowed"),
    (_payload(READ, _op("call", 1, "torch.nn.functional.relu", [{"$": "Ref", "id": 0}], [("inplace", _c(True))])),
     "`inplace=` is not allowed in the IR"),
    (_payload(READ, _op("call", 1, "Tensor.to", [{"$": "Ref", "id": 0}, _c("cuda")])), "Tensor.to converts dtypes only"),
    (_payload(READ, _op("call", 1, "Tensor.to", [{"$": "Ref", "id": 0}, {"$": "DTypeArg", "name": "load"}])),
     "unknown dtype 'load'"),
    (_payload(_op("module", 0, "__class__")), "module path '__class__' has the part '__class__'"),
    (_payload(_op("weight", 0, "layer1._parameters")), "has the part '_parameters'"),
    (_payload(_op("call", 0, "add", [_c(10**30), _c(1)])), "an integer outside int64"),
    (_payload(_op("call", 0, "add", [_c("x" * 5000), _c(1)])), "a string of 5000 characters"),
    (_payload(_op("save", None, "s", [{"$": "Ref", "id": 7}])), "op 0 (save s): uses %7 before it is defined"),
    (_payload(_op("call", 0, "add", [_c(1), _c(1)], __class__="x")), "op 0: Op.__init__() got an unexpected keyword"),
    (_payload(READ, _op("call", 1, "field", [{"$": "Ref", "id": 0}, _c("__dict__")])),
     "field takes a value and a plain field name"),
    ('{"$": "Program", "ops": ' + "[" * 5000 + "]" * 5000 + "}", "not JSON"),
    ("x" * (65 * 2**20), "the payload is 68157440 bytes"),
    (json.dumps({"$": "Program", "ops": [], "n_invokes": 10**9}), "n_invokes is an integer from 1 to 65536"),
    # saves: an identifier name; a step and a point on saves only, typed and bounded
    (_payload(READ, _op("save", None, "h@1", [{"$": "Ref", "id": 0}])), "op 1: a save's name is an identifier"),
    (_payload(READ, _op("save", None, "../../x", [{"$": "Ref", "id": 0}])), "not '../../x'"),
    (_payload(_op("read", 0, step=1, site=READ["site"])), "op 0: a read has no step or point"),
    (_payload(READ, _op("call", 1, "add", [{"$": "Ref", "id": 0}, _c(1)], point=[["layer", 0]])),
     "op 1: a call has no step or point"),
    (_generating(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], step="1")), "a save's step is an integer from 0"),
    (_generating(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], step=-1)), "a save's step is an integer from 0"),
    (_generating(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], step=True)), "a save's step is an integer from 0"),
    (_generating(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], step=4)),
     "op 1 (save h): a save at step 4 of a generation of 4 steps"),
    (_payload(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], step=0)),
     "op 1 (save h): a save at step 0 in a program that does not generate"),
    (_payload(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], point=[["layer", -1]])),
     "a save's point is a list of [axis name, index] pairs"),
    (_payload(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], point=[["__class__.x", 0]])),
     "a save's point is a list of [axis name, index] pairs"),
    (_payload(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], point="layer=0")),
     "a save's point is a list of [axis name, index] pairs"),
    (_payload(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], point=[["layer", 0], ["layer", 1]])),
     "a save's point names each axis once"),
    (_generating(READ, _op("save", None, "h", [{"$": "Ref", "id": 0}], step=1), _op("save", None, "h", [{"$": "Ref", "id": 0}])),
     "op 2 (save h): the name h is saved per step and once"),
]


@pytest.mark.parametrize("text, message", HOSTILE_PAYLOADS, ids=range(len(HOSTILE_PAYLOADS)))
def test_hostile_payload_is_one_error_naming_the_op(text, message, armed):
    with pytest.raises(PayloadError) as e, armed(no_files=True):
        loads(text)
    assert message in str(e.value)
    assert len(e.value.diagnostics) == 1


def test_python_integers_stay_bounded_in_a_checked_program(net):
    """A chain of squarings would grow an integer without bound: each op stays within int64."""
    program = loads(_payload(_op("call", 0, "mul", [_c(2**62), _c(2**62)])))
    table = record_sites(net, (torch.rand(1, 5),), {}, 1)
    with pytest.raises(CheckError, match="outside int64"):
        check(program, table, net, {}, [slice(0, 1)])


# ------------------------------------------------------------------ mutations never escape
HOSTILE_STRINGS = ["getattr", "os.system", "__class__", "eval", "torch.load", "builtins.open", "_modules",
                   "__globals__", "subprocess.Popen", "layer1.__init__", "load", "Tensor.__reduce_ex__",
                   "torch.save", "__import__", "Tensor.data_ptr", "einops.reduce", "Tensor.add_"]


def _valid_payload(net) -> str:
    model = NNsight(net)
    with model.trace(torch.rand(2, 5)) as tracer:
        h = model.layer1.output
        h[:, 0] = 0
        (h.softmax(dim=-1) * 2).topk(2).indices.save("top")
        model.layer2.output.sum(dim=-1, keepdim=True).save("s")
    return dumps(tracer.program())


def _mutate(data, draw):
    """Replace one node of the JSON tree (chosen by `choices`) with a hostile value."""
    nodes = []

    def walk(x, parent, key):
        nodes.append((parent, key))
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, x, k)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, x, i)
    walk(data, None, None)
    parent, key = nodes[draw(st.integers(0, len(nodes) - 1))]
    if parent is not None:
        parent[key] = draw(st.one_of(st.sampled_from(HOSTILE_STRINGS), st.integers(-2**70, 2**70), st.none(),
                                     st.just({"$": "Const", "value": draw(st.sampled_from(HOSTILE_STRINGS))}),
                                     st.just([]), st.just({"$": "Ref", "id": draw(st.integers(0, 9))})))
    return data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_payloads_never_leave_the_vocabulary(net, armed, data):
    mutated = json.loads(_valid_payload(net))
    for _ in range(data.draw(st.integers(1, 3))):
        mutated = _mutate(mutated, data.draw)
    x = torch.rand(2, 5)
    weights = [p.clone() for p in net.parameters()]
    table = record_sites(net, (x,), {}, 2)
    with armed(no_files=True):  # checking and running a payload open no file at all
        try:
            program = loads(json.dumps(mutated))
        except PayloadError:
            return
        assert all(op.target in vocabulary.vocabulary() for op in program.ops if op.opcode == "call")
        try:
            typed = check(program, table, net, {}, [slice(0, 2)])
            run(net, typed, Batch((x,), {}, (slice(0, 2),), 2), {})
        except (CheckError, ExecutionError):
            pass
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters(), strict=True))


# ----------------------------------------------------------------------- in-place semantics
def test_inplace_flag_on_a_module_value_is_a_write(net):
    model = NNsight(net)
    x = torch.randn(3, 5)
    with model.trace(x) as tracer:
        F.relu(model.layer1.output, inplace=True)
        out = model.layer2.output.save()
    assert [op.opcode for op in tracer.program().ops].count("write") == 1
    expected = net.layer2(torch.relu(net.layer1(x)))
    torch.testing.assert_close(out.value, expected)


def test_inplace_method_on_a_computed_value_leaves_the_forward_alone(net):
    model = NNsight(net)
    x = torch.randn(3, 5)
    with model.trace(x) as tracer:
        h = model.layer1.output * 1.0
        h.add_(100.0)
        shifted = h.save()
        out = model.layer2.output.save()
    assert "write" not in [op.opcode for op in tracer.program().ops]
    torch.testing.assert_close(out.value, net(x))
    torch.testing.assert_close(shifted.value, net.layer1(x) + 100.0)


def test_out_and_inplace_on_weights_are_refused_at_the_call(net):
    model = NNsight(net)
    weight = net.layer1.weight.clone()
    with pytest.raises(UnsupportedOperationError, match="`out=` is not allowed") as e:
        with model.trace(torch.rand(1, 5)):
            w = model.layer1.weight
            torch.mul(w, 0.0, out=w)
    assert "test_hostile.py" in str(e.value)
    with pytest.raises(UnsupportedOperationError, match="would change a weight of the model in place"):
        with model.trace(torch.rand(1, 5)):
            model.layer1.weight.mul_(0.0)
    torch.testing.assert_close(net.layer1.weight, weight)


def test_attributes_outside_the_vocabulary_are_refused_in_python(net):
    model = NNsight(net)
    with pytest.raises(UnsupportedOperationError, match=r"tensor method \.data_ptr is not in"):
        with model.trace(torch.rand(1, 5)):
            model.layer1.output.data_ptr()
    with pytest.raises(UnsupportedOperationError, match="did you mean 'softmax'"):
        with model.trace(torch.rand(1, 5)):
            model.layer1.output.sofmax(dim=-1)


# --------------------------------------------------------------------------------- the docs
def test_vocabulary_doc_is_generated_from_the_table():
    assert (ROOT / "docs" / "vocabulary.md").read_text() == vocabulary.markdown()


def test_every_entry_is_a_real_function_and_never_takes_out():
    for name, entry in vocabulary.vocabulary().items():
        assert callable(entry.func), name
        assert "out" not in entry.keywords and "inplace" not in entry.keywords, name
        assert not name.rpartition(".")[2].startswith("_"), name
