"""Sessions (`model.session()`): traces in order whose unsaved values later traces use, on one
model or two; early exit; against the same work with `.save()` in separate traces."""

from __future__ import annotations

import pytest
import torch

from interp_dsl import InterventionError

EIFFEL, ROME = "the eiffel tower is in the city of", "rome is in"


def test_a_later_trace_uses_an_unsaved_value_of_an_earlier_one(llama):
    with llama.session():
        with llama.trace(EIFFEL) as first:
            hidden = llama.model.layers[2].output[:, -1, :]  # no .save()
            answer = llama.lm_head.output.argmax(dim=-1).save()
        with llama.trace(ROME) as second:
            llama.model.layers[0].output[:, -1, :] = hidden
            patched = llama.lm_head.output.save()
    with llama.trace(EIFFEL):
        want_hidden = llama.model.layers[2].output[:, -1, :].save()
    with llama.trace(ROME):
        llama.model.layers[0].output[:, -1, :] = want_hidden
        want = llama.lm_head.output.save()
    assert torch.equal(patched.value, want.value)
    assert torch.equal(hidden.value, want_hidden.value)
    assert list(first.result.saves) == [answer._save_name] and list(second.result.saves) == [patched._save_name]


def test_traces_of_two_models_share_a_session(llama, lm):
    with llama.session():
        with llama.trace(EIFFEL):
            hidden = llama.model.layers[1].output[:, -1, :]
        other = lm.transformer.h if hasattr(lm.module, "transformer") else lm.model.layers
        with lm.trace(ROME):
            other[1].output[:, -1, :] = hidden
            swapped = lm.lm_head.output.save()
    with llama.trace(EIFFEL):
        kept = llama.model.layers[1].output[:, -1, :].save()
    with lm.trace(ROME):
        other[1].output[:, -1, :] = kept
        want = lm.lm_head.output.save()
    assert torch.equal(swapped.value, want.value)


def test_exit_ends_the_session_and_keeps_what_ran(llama, capsys):
    ran = []
    with llama.session() as session:
        with llama.trace(EIFFEL):
            top = llama.lm_head.output.argmax(dim=-1).save()
        session.log("top", top)
        session.exit()
        ran.append("after exit")  # pragma: no cover
    assert ran == [] and top.value.shape == (1, 8)
    assert capsys.readouterr().out.startswith("top tensor([[")


def test_python_between_traces_runs_in_order_training_a_tensor(llama):
    """seed 004's LoRA loop in a session: the optimizer steps between the traces."""
    torch.manual_seed(0)
    delta = torch.zeros(32, requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=0.5)
    losses = []
    with llama.session():
        for _ in range(4):
            with llama.trace(ROME):
                llama.model.layers[2].output[:, -1, :] += delta
                loss = torch.nn.functional.cross_entropy(llama.lm_head.output[:, -1], torch.tensor([7]))
                loss.backward()
            losses.append(float(loss))  # a kept value, readable after its trace
            optimizer.step()
            optimizer.zero_grad()
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]


def test_outside_a_session_an_unsaved_value_is_refused(llama):
    with llama.trace(EIFFEL):
        hidden = llama.model.layers[2].output[:, -1, :]
    with pytest.raises(InterventionError, match="this value was not saved"):
        with llama.trace(ROME):
            llama.model.layers[0].output[:, -1, :] = hidden


def test_sessions_do_not_nest(llama):
    with llama.session():
        with pytest.raises(InterventionError, match="sessions do not nest"):
            with llama.session():
                pass


def test_a_scan_in_a_session_keeps_shapes_for_the_traces_after_it(llama):
    with llama.session():
        with llama.scan("the eiffel tower is in the city of"):
            hidden = llama.model.layers[1].output[:, -1, :]
        with llama.scan("rome is in"):
            llama.model.layers[1].output[:, -1, :] = hidden
            out = llama.lm_head.output[:, -1].save()
    assert out.shape == (1, 64)
    with pytest.raises(InterventionError, match="shapes do not broadcast"):
        with llama.session():
            with llama.scan("the eiffel tower is in the city of"):
                hidden = llama.model.layers[1].output[:, :, :5]
            with llama.scan("rome is in"):
                llama.model.layers[1].output[:, -1, :] += hidden
