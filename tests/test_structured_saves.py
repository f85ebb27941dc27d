"""Structured saves: a save op carries its generation step and vectorised sweep point as fields;
its name is an identifier, refused at the user's line otherwise; the flat `name@step` form exists
only as a tensor name in `ivx run`'s files."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from helpers import GEN_PROMPTS as PROMPTS
from helpers import endless, layers

from compiler.errors import InterventionError
from compiler.ir import Const, Generation, Op, Program, Ref, SaveKey, Site, dumps, from_json, loads, to_json
from compiler.printer import format_op
from grammar.decompile import to_ivx
from grammar.parser import IvxSyntaxError, parse
from grammar.printer import format_module
from interp_dsl import Model
from interp_dsl.ivx import experiment_from_text, lower
from interp_dsl.sweeps import steps_as_columns
from runtime.sweep_runner import SweepPlan, _as_rows

FORWARD = Program((Op("read", 0, site=Site("layer1", "output")), Op("call", 1, target="mul", args=(Ref(0), Const(2))),
                   Op("save", target="h", args=(Ref(1),))))


def _save(step=None, point=()):
    return Op("save", target="h", args=(Ref(0),), step=step, point=point)


def _line_below() -> int:
    return inspect.currentframe().f_back.f_lineno + 1


# ------------------------------------------------------------------------------------ the IR
def test_a_program_without_steps_or_points_keeps_its_json_and_hash():
    """Hashes pinned before the fields existed: stored manifests of such programs still match."""
    assert FORWARD.structural_hash() == "bf52978323b0ae4d9c97184fbeaff2336d2b0f9583e0ec7306f02dc9b462ae34"
    generating = Program(FORWARD.ops, generation=Generation(3))
    assert generating.structural_hash() == "96aa33ed2c3db30ff07388ba3365c2fbdcff3842d112cb866e473c9b2c8a2423"
    assert {"step", "point"}.isdisjoint(to_json(FORWARD.ops[2]))


def test_step_and_point_are_json_fields_that_round_trip_and_hash():
    op = _save(step=2, point=(("layer", 1), ("pos", 0)))
    data = to_json(op, spans=False)
    assert data["step"] == 2 and data["point"] == [["layer", 1], ["pos", 0]] and data["target"] == "h"
    assert from_json(json.loads(json.dumps(data))) == op
    program = Program((Op("read", 0, site=Site("layer1", "output")), op), generation=Generation(4))
    assert loads(dumps(program)) == program
    hashes = {Program((program.ops[0], o), generation=Generation(4)).structural_hash()
              for o in (_save(), _save(step=2), _save(step=3), _save(point=(("layer", 1),)))}
    assert len(hashes) == 4
    assert op.save_key == SaveKey("h", 2, (("layer", 1), ("pos", 0)))


@pytest.mark.parametrize("make, message", [
    (lambda: Op("read", 0, site=Site("layer1", "output"), step=1), "a read has no step or point"),
    (lambda: Op("call", 0, target="add", point=(("layer", 0),)), "a call has no step or point"),
    (lambda: Op("save", target="h@1", args=(Ref(0),)), "a save's name is an identifier"),
    (lambda: Op("save", target="h-1", args=(Ref(0),)), "not 'h-1'"),
])
def test_the_ir_refuses_misplaced_fields_and_bad_save_names(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_printer_shows_step_and_point():
    assert format_op(_save()) == "save %0 as 'h'"
    assert format_op(_save(step=2)) == "save %0 as 'h' step 2"
    assert format_op(_save(point=(("layer", 1), ("pos", 0)))) == "save %0 as 'h' at layer=#1, pos=#0"


# ---------------------------------------------------------------------------- names, located
def test_a_python_save_name_that_is_not_an_identifier_is_refused_at_its_line(net):
    model = Model(net)
    with pytest.raises(InterventionError) as e, model.trace(torch.rand(1, 5)):
        line = _line_below()
        model.layer1.output.save("h@1")
    diagnostic = e.value.diagnostics[0]
    assert (diagnostic.span.file, diagnostic.span.line) == (__file__, line)
    assert "the save name 'h@1' is not an identifier" in diagnostic.message and "'h_1'" in diagnostic.hint
    with pytest.raises(InterventionError) as e, model.trace(torch.rand(1, 5)) as tracer:
        h = model.layer1.output
        line = _line_below()
        tracer.save(h, "1-h")
    assert e.value.diagnostics[0].span.line == line and "'s_1_h'" in e.value.diagnostics[0].hint
    with pytest.raises(InterventionError, match="a save's name is a string, not a int"), model.trace(torch.rand(1, 5)):
        model.layer1.output.save(3)


def test_default_and_identifier_names_still_save(net):
    model = Model(net)
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        model.layer1.output.save()
        model.layer2.output.save("out_2")
    assert set(tracer.result.saves) == {"save0", "out_2"}
    torch.testing.assert_close(tracer.result.saves["out_2"], net(x))


def test_an_ivx_save_name_that_is_not_an_identifier_is_a_syntax_error_at_its_line():
    with pytest.raises(IvxSyntaxError) as e:
        parse('prompt p = "a"\ninvoke p {\n    save h@1 = model.layer1.output\n}\n', "exp.ivx")
    diagnostic = e.value.diagnostics[0]
    assert (diagnostic.span.line, diagnostic.span.col) == (3, 11)
    assert "`save` needs a name of letters, digits and _" in diagnostic.message


# ------------------------------------------------------------------------------------ steps
def test_loop_and_block_saves_carry_their_step_under_one_name():
    gen = endless("llama")
    with gen.generate(PROMPTS, max_new_tokens=4) as loop:
        hidden = [layers(gen)[2].output[:, -1, :].save("h") for _ in loop.iter[1:4]]
    with gen.generate(PROMPTS, max_new_tokens=4) as block:
        with block.iter[1:4]:
            same = layers(gen)[2].output[:, -1, :].save("h")
    for tracer in (loop, block):
        saves = [op for op in tracer.program().ops if op.opcode == "save"]
        assert [(op.target, op.step, op.point) for op in saves] == [("h", 1, ()), ("h", 2, ()), ("h", 3, ())]
        assert set(tracer.result.saved) == {SaveKey("h", 1), SaveKey("h", 2), SaveKey("h", 3)}
        assert len(tracer.result.saves["h"]) == 3
    for k, value in enumerate(same.value):
        assert torch.equal(loop.result.saves["h"][k], hidden[k].value)
        assert torch.equal(block.result.saved[SaveKey("h", k + 1)], value)
        torch.testing.assert_close(hidden[k].value, value)


def test_a_name_saved_per_step_and_once_is_refused_at_the_later_save():
    gen = endless("llama")
    with pytest.raises(InterventionError) as e, gen.generate(PROMPTS, max_new_tokens=3) as tracer:
        with tracer.all():
            layers(gen)[1].output[:, -1].save("h")
        line = _line_below()
        layers(gen)[2].output.save("h")
    assert e.value.diagnostics[0].span.line == line
    assert "the name h is saved per step and once" in e.value.diagnostics[0].message


def test_step_saves_decompile_to_a_one_step_block_and_lower_back():
    gen = endless("llama")
    with gen.generate(PROMPTS[0], max_new_tokens=4, seed=3) as tracer:
        with tracer.iter[1:3]:
            layers(gen)[2].output[:, -1, :].save("h")
    program = tracer.program()
    text = format_module(to_ivx(program))
    assert "generate max_new_tokens=4, seed=3" in text and text.count("steps [") == 2, text
    exp = experiment_from_text(text, "roundtrip.ivx", prompts={"invoke0": PROMPTS[0]})
    again = lower(exp, gen, {})
    assert again.program() == program, text
    assert [torch.equal(a, b) for a, b in zip(again.result.saves["h"], tracer.result.saves["h"], strict=True)] \
        == [True, True]


def test_steps_as_columns_stacks_equal_shapes_and_names_each_step_otherwise():
    a1, a2, c = torch.rand(2, 3), torch.rand(2, 3), torch.rand(4)
    b0, b1 = torch.rand(2, 5, 3), torch.rand(2, 1, 3)
    out = steps_as_columns({SaveKey("a", 2): a2, SaveKey("b", 1): b1, SaveKey("a", 1): a1, SaveKey("c"): c,
                            SaveKey("b", 0): b0})
    assert set(out) == {SaveKey("a"), SaveKey("b@0"), SaveKey("b@1"), SaveKey("c")}
    assert torch.equal(out[SaveKey("a")], torch.stack([a1, a2], dim=1))  # [rows, steps, ...]
    assert out[SaveKey("b@0")] is b0 and out[SaveKey("b@1")] is b1 and out[SaveKey("c")] is c


# ----------------------------------------------------------------------------------- points
def test_sweep_rows_come_from_the_point_field_not_the_name():
    """Axis values 5 and 7 are not indices: the point holds indices into them."""
    plan = SweepPlan(FORWARD, {}, [{}], {"layer": [5, 7]}, [("p", True)], batch_size=2, shard_prompts=4)
    first, second, once = torch.rand(4, 3), torch.rand(4, 3), torch.rand(2, 6)
    saves = {SaveKey("h", None, (("layer", 1),)): second, SaveKey("h", None, (("layer", 0),)): first,
             SaveKey("x"): once}
    rows = _as_rows(plan, saves, real=1, shapes={})
    assert torch.equal(rows["h"], torch.stack([first[0:1], second[2:3]]))
    assert torch.equal(rows["x"], torch.stack([once[:1], once[:1]]))


def test_a_vectorised_sweep_saves_one_name_with_a_point_per_value(llama):
    prompts = ["the eiffel tower is in the city of", "paris is a city"]
    with llama.sweep(prompts, batch_size=2, compile="off") as sweep:
        layer = sweep.param("layer", [2, 0])
        llama.model.layers[layer].output[:, -1, :].save("h")
    saves = [op for op in sweep.tracer.program().ops if op.opcode == "save"]
    assert [(op.target, op.step, op.point) for op in saves] == [("h", None, (("layer", 0),)),
                                                                ("h", None, (("layer", 1),))]
    grid = sweep.results.grid("h")
    for i, prompt in enumerate(prompts):
        for j, layer_index in enumerate([2, 0]):
            with llama.trace(prompt, compile="off"):
                h = llama.model.layers[layer_index].output[:, -1, :].save()
            torch.testing.assert_close(grid[i, j], h.value[0], atol=1e-5, rtol=1e-5)


def test_a_point_save_has_no_ivx_spelling():
    from grammar.decompile import NotPrintable
    program = Program((Op("read", 0, site=Site("layer1", "output")), _save(point=(("layer", 0),))))
    with pytest.raises(NotPrintable, match="one point of a vectorised sweep"):
        to_ivx(program)
