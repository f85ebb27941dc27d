"""The nnsight walkthrough's tiny two-layer network, with values checked against plain torch."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import interp_dsl
from interp_dsl import CheckError, NNsight, ProxyControlFlowError, UnknownModuleError, ValueUnavailableError


@pytest.fixture
def tiny(net):
    return NNsight(net)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand((1, 5))


def test_print_shows_module_tree(tiny, net):
    assert repr(tiny) == repr(net)
    assert "(layer1): Linear(in_features=5, out_features=10, bias=True)" in repr(tiny)


def test_getting_outputs_and_inputs(tiny, net, x):
    with tiny.trace(x):
        output = tiny.output.save()
        l1 = tiny.layer1.output.save()
        l2_input = tiny.layer2.input.save()
        l2_inputs = tiny.layer2.inputs.save()
    assert_close(output.value, net(x))
    assert_close(l1.value, net.layer1(x))
    assert_close(l2_input.value, net.layer1(x))
    args, kwargs = l2_inputs.value
    assert_close(args[0], net.layer1(x))
    assert kwargs == {}


def test_unsaved_value_is_not_available(tiny, x):
    with tiny.trace(x):
        output = tiny.output
    with pytest.raises(ValueUnavailableError, match="not saved"):
        output.value


def test_operations_and_torch_functions(tiny, net, x):
    with tiny.trace(x):
        l1_amax = torch.argmax(tiny.layer1.output, dim=1).save()
        value = (tiny.layer1.output.sum() + tiny.layer2.output.sum()).save()
    h = net.layer1(x)
    assert torch.equal(l1_amax.value, torch.argmax(h, dim=1))
    assert_close(value.value, h.sum() + net(x).sum())
    assert l1_amax[0] == torch.argmax(h, dim=1)[0]  # a saved proxy acts as its value


def test_setting_with_slice_and_clone(tiny, net, x):
    with tiny.trace(x):
        before = tiny.layer1.output.clone().save()
        tiny.layer1.output[:, 9] = 0
        after = tiny.layer1.output.save()
        out = tiny.output.save()
    h = net.layer1(x)
    edited = h.clone()
    edited[:, 9] = 0
    assert_close(before.value, h)
    assert_close(after.value, edited)
    assert_close(out.value, net.layer2(edited))


def test_out_of_range_index_is_a_located_error_and_nothing_runs(tiny, net, x):
    from torch._subclasses.fake_tensor import FakeTensor
    real_calls = []
    handle = net.register_forward_hook(
        lambda m, a, o: real_calls.append(1) if not isinstance(o, FakeTensor) else None)
    try:
        with pytest.raises(CheckError) as err:
            with tiny.trace(x):
                tiny.layer1.output[:, 10] = 0
    finally:
        handle.remove()
    message = str(err.value)
    assert f"{__file__}:" in message and "index 10 on dim 1 of size 10" in message
    assert "tiny.layer1.output[:, 10] = 0" in message  # the user's line, quoted
    assert real_calls == []  # only the fake-tensor check ran, never the real model


def test_noise_replacement_uses_shape_inside_block(tiny, net, x):
    torch.manual_seed(3)
    with tiny.trace(x):
        before = tiny.layer1.output.clone().save()
        noise = (0.001**0.5) * torch.randn(before.shape)
        tiny.layer1.output = before + noise
        after = tiny.layer1.output.save()
        out = tiny.output.save()
    delta = after.value - before.value
    assert 0 < delta.abs().max() < 0.2
    assert_close(out.value, net.layer2(after.value))


def test_scan_gives_shapes_without_running(tiny, net, x):
    with tiny.scan(x):
        dim = tiny.layer1.output.shape[-1]
        shape = tiny.layer1.output.shape.save()
        l2 = tiny.layer2.output.save()
    assert dim == 10 and shape == torch.Size([1, 10])
    assert l2.shape == torch.Size([1, 2])  # shapes survive a scan; values are never computed


def test_apply_style_custom_sum_matches(tiny, net, x):
    with tiny.trace(x):
        total = interp_dsl.save(tiny.layer1.output.sum())
    assert_close(total.value, net.layer1(x).sum())


@pytest.mark.reference_only
@pytest.mark.parametrize("spelling", ["tracer", "module"])
def test_early_stop(tiny, net, x, spelling):
    from torch._subclasses.fake_tensor import FakeTensor
    ran = []
    handle = net.layer2.register_forward_hook(
        lambda m, a, o: ran.append(1) if not isinstance(o, FakeTensor) else None)
    try:
        with tiny.trace(x) as tracer:
            l1 = tiny.layer1.output.save()
            l2 = tiny.layer2.output.save()
            if spelling == "tracer":
                tracer.stop()
            else:
                tiny.layer1.output.stop()
    finally:
        handle.remove()
    assert_close(l1.value, net.layer1(x))
    if spelling == "module":
        assert ran == []
        with pytest.raises(ValueUnavailableError, match="stopped"):
            l2.value
    else:  # everything requested before tracer.stop() still runs
        assert_close(l2.value, net(x))


def test_unknown_module_name_suggests(tiny):
    with pytest.raises(UnknownModuleError, match="did you mean 'layer1'") as err:
        tiny.layr1
    assert f"{__file__}:" in str(err.value)
    assert isinstance(err.value, AttributeError)


def test_python_control_flow_on_proxy_is_named_error(tiny, x):
    with pytest.raises(ProxyControlFlowError, match="torch.where") as err:
        with tiny.trace(x):
            if tiny.layer1.output.sum() > 0:
                pass
    assert f"{__file__}:" in str(err.value)


def test_failed_run_leaves_model_clean(tiny, net, x):
    with pytest.raises(CheckError):
        with tiny.trace(x):
            tiny.layer1.output = torch.zeros(3, 3)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert tiny._tracer is None
    with tiny.trace(x):
        out = tiny.output.save()
    assert_close(out.value, net(x))
