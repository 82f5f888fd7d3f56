"""EfficientNet-Lite0's inference path: batch norms folded into the convolutions must not change the features."""
from __future__ import annotations

import pytest
import torch

from clad.backbones.efficientnet import EfficientNetLite0

LAYERS = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(scope="module")
def net():
    """Random weights and batch-norm statistics far from the identity, so a wrong fold shows."""
    torch.manual_seed(0)
    bb = EfficientNetLite0(pretrained=False)
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return bb


def _reference(bb, x):
    """The module's own forward (batch norms and padding as the package runs them)."""
    with torch.no_grad():
        h = bb.net._swish(bb.net._bn0(bb.net._conv_stem(x)))
        out = {}
        stage_end = {2: "stage1", 4: "stage2", 10: "stage3", 15: "stage4"}
        for i, block in enumerate(bb.net._blocks):
            h = block(h)
            if i in stage_end:
                out[stage_end[i]] = h.clone()
    return out


@pytest.mark.parametrize("size", [64, 72])  # 72: odd grids at strides 8-32, where 'same' padding differs
def test_fused_inference_equals_the_modules(net, size):
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    ref = _reference(net, x)
    with torch.inference_mode():
        fused = net(x, LAYERS)
    for name in LAYERS:
        assert fused[name].shape == ref[name].shape
        scale = ref[name].abs().max()
        assert (fused[name] - ref[name]).abs().max() <= 1e-5 * scale, name


def test_grad_and_train_mode_use_the_modules(net):
    """With autograd on, the forward runs the modules (batch norms and all), so gradients flow to them."""
    x = torch.randn(1, 3, 64, 64)
    out = net(x, ["stage2"])["stage2"]
    assert out.requires_grad
    out.sum().backward()
    bn = net.net._blocks[3]._bn2
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    net.zero_grad()


def test_folded_weights_follow_changes(net):
    """An in-place change of a weight (a fine-tuning step, load_state_dict) is seen by the next inference."""
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = net(x, ["stage2"])["stage2"].clone()
    bn = net.net._blocks[3]._bn2
    with torch.no_grad():
        bn.bias.add_(1.0)
    try:
        with torch.inference_mode():
            after = net(x, ["stage2"])["stage2"]
        assert torch.allclose(after, _reference(net, x)["stage2"], atol=1e-4)
        assert (after - before).abs().max() > 0.5
    finally:
        with torch.no_grad():
            bn.bias.sub_(1.0)


def test_run_stage_fuses_copies_in_eval_only(net):
    """A fine-tuned copy of a stage (CLAD's tail) is fused when it runs in eval mode without autograd."""
    import copy

    tail = torch.nn.ModuleList(copy.deepcopy(net.blocks_of_stage("stage3")))
    h = _reference(net, torch.randn(2, 3, 64, 64))["stage2"]
    with torch.no_grad():
        ref = h
        for block in tail:
            ref = block(ref)
        tail[0]._bn0.running_mean.add_(0.3)  # the copy diverges from the backbone's own stage
        changed = h
        for block in tail:
            changed = block(changed)
    with torch.inference_mode():
        assert torch.allclose(net.run_stage("stage3", h), ref, atol=1e-4)
        assert torch.allclose(net.run_stage("stage3", h, tail), changed, atol=1e-4)
    tail.train()
    with torch.no_grad():
        out = net.run_stage("stage3", h, tail)  # train mode: batch statistics, not the folded running ones
    assert not torch.allclose(out, changed, atol=1e-3)
