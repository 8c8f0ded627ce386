"""InceptionI3d: pytorch-i3d checkpoint layout, state-dict round trip, pooling, 'same' padding."""

import pytest
import torch
import torch.nn.functional as F

from extractors.i3d import TRUNK, MaxPool3dSame, Unit3D, inception_i3d, load_pytorch_i3d_state_dict, same_padding

# The published pytorch-i3d layout: three stem units, nine Inception blocks of six units, a logits conv.
STEM_UNITS = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
MIXED_BLOCKS = [
    "Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c"
]
BRANCHES = ["b0", "b1a", "b1b", "b2a", "b2b", "b3b"]
UNIT_KEYS = ["conv3d.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
PYTORCH_I3D_KEYS = {
    f"{unit}.{key}"
    for unit in STEM_UNITS + [f"{block}.{branch}" for block in MIXED_BLOCKS for branch in BRANCHES]
    for key in UNIT_KEYS
} | {"logits.conv3d.weight", "logits.conv3d.bias"}

# Shapes of a few keys of pytorch-i3d's flow_imagenet.pt.
FLOW_CHECKPOINT_SHAPES = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 2, 7, 7, 7),
    "Conv3d_1a_7x7.bn.running_var": (64,),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_3b.b2b.conv3d.weight": (32, 16, 3, 3, 3),
    "Mixed_3b.b3b.conv3d.weight": (32, 192, 1, 1, 1),
    "Mixed_4f.b1a.conv3d.weight": (160, 528, 1, 1, 1),
    "Mixed_5b.b0.conv3d.weight": (256, 832, 1, 1, 1),
    "Mixed_5c.b0.conv3d.weight": (384, 832, 1, 1, 1),
    "Mixed_5c.b3b.bn.bias": (128,),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}


def randomise_batch_norm(model: torch.nn.Module) -> None:
    # Fresh BatchNorm statistics are 0/1, which would hide a lost buffer in a round trip.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)


def test_state_dict_keys_match_pytorch_i3d():
    model = inception_i3d(in_channels=2, num_classes=400)
    state = model.state_dict()
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    assert keys == PYTORCH_I3D_KEYS
    for key, shape in FLOW_CHECKPOINT_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert model.feature_dim == 1024
    bn = model.Mixed_4c.b1b.bn
    assert (bn.eps, bn.momentum) == (0.001, 0.01)


def test_tiny_variant_keeps_the_layout():
    model = inception_i3d(in_channels=2, width_multiplier=1 / 8)
    keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == PYTORCH_I3D_KEYS
    assert model.feature_dim == 128
    assert model.Conv3d_1a_7x7.conv3d.weight.shape == (8, 2, 7, 7, 7)


def test_saved_state_dict_loads_with_weights_only_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = inception_i3d(in_channels=2, width_multiplier=1 / 8).eval()
    randomise_batch_norm(model)
    path = tmp_path / "flow_imagenet.pt"
    # Old pytorch-i3d files predate BatchNorm's num_batches_tracked buffer.
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}, path)

    torch.manual_seed(1)
    loaded = inception_i3d(in_channels=2, width_multiplier=1 / 8).eval()
    load_pytorch_i3d_state_dict(loaded, torch.load(path, weights_only=True), str(path))

    x = torch.randn(2, 2, 9, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.extract_features(x), loaded.extract_features(x))
        assert torch.equal(model(x), loaded(x))


def test_loading_a_checkpoint_of_another_shape_names_the_file():
    rgb_state = inception_i3d(in_channels=3, width_multiplier=1 / 8).state_dict()
    flow_model = inception_i3d(in_channels=2, width_multiplier=1 / 8)
    with pytest.raises(ValueError, match="rgb_imagenet.pt"):
        load_pytorch_i3d_state_dict(flow_model, rgb_state, "rgb_imagenet.pt")
    with pytest.raises(ValueError, match="missing keys"):
        load_pytorch_i3d_state_dict(flow_model, {}, "empty.pt")


def test_same_padding_is_tensorflow_same():
    # ceil(size / stride) outputs; the odd padding pixel goes at the back.
    assert same_padding((7, 224, 223), (7, 7, 7), (2, 2, 2)) == (3, 3, 2, 3, 3, 3)  # (W, H, T) pairs
    assert same_padding((4, 56, 56), (1, 3, 3), (1, 2, 2)) == (0, 1, 0, 1, 0, 0)
    model = inception_i3d(in_channels=2, width_multiplier=1 / 8)
    assert model.Conv3d_1a_7x7(torch.zeros(1, 2, 7, 57, 64)).shape == (1, 8, 4, 29, 32)


def test_pooling_matches_pytorch_i3d_average_pool_at_224():
    torch.manual_seed(0)
    model = inception_i3d(in_channels=2, width_multiplier=1 / 8).eval()
    x = torch.randn(1, 2, 24, 224, 224)
    with torch.no_grad():
        trunk = x
        for name in TRUNK:
            trunk = getattr(model, name)(trunk)
        assert trunk.shape[2:] == (3, 7, 7)
        reference = F.avg_pool3d(trunk, kernel_size=(2, 7, 7), stride=1).flatten(2)  # pytorch-i3d's pool
        torch.testing.assert_close(model.temporal_features(x), reference)
        torch.testing.assert_close(model.extract_features(x), reference.mean(dim=2))
        assert model(x).shape == (1, 400, 2)


def test_short_clips_too_short_for_pytorch_i3d_still_give_features():
    model = inception_i3d(in_channels=2, width_multiplier=1 / 8).eval()
    with torch.no_grad():
        features = model.extract_features(torch.randn(2, 2, 7, 64, 64))  # 8-frame clip -> 7 flow fields
    assert features.shape == (2, 128)
    assert torch.isfinite(features).all()


def test_random_weights_keep_the_input_scale():
    """Random-weight I3D (the demo, the tests) must not shrink its input to nothing: with PyTorch's default
    conv init the features were ~1e-7, below the scorer's BatchNorm eps, and carried no usable signal."""
    torch.manual_seed(0)
    model = inception_i3d(in_channels=2, width_multiplier=1 / 8).eval()
    slow, fast = (torch.full((1, 2, 16, 112, 112), speed) + 0.05 * torch.randn(1, 2, 16, 112, 112) for speed in (0.05, 0.3))
    with torch.no_grad():
        features_slow, features_fast = model.extract_features(slow), model.extract_features(fast)
    assert features_fast.abs().mean() > 0.05
    assert (features_fast - features_slow).abs().mean() > 0.01  # different motion, clearly different features


def test_a_channels_last_network_stays_channels_last_and_gives_the_same_features():
    """Every Inception block's output keeps the input's layout (a mixed torch.cat fell back to contiguous
    and slowed every later pool ~10x), and the layout changes the features by float rounding only."""
    torch.manual_seed(0)
    model = inception_i3d(in_channels=2, width_multiplier=1 / 4).eval()
    x = torch.randn(1, 2, 16, 112, 112)
    with torch.no_grad():
        expected = model.extract_features(x)
        fast = model.to(memory_format=torch.channels_last_3d)
        layouts = []
        hooks = [getattr(fast, name).register_forward_hook(
            lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d)))
            for name in TRUNK if name.startswith("Mixed")]
        got = fast.extract_features(x.contiguous(memory_format=torch.channels_last_3d))
        for hook in hooks:
            hook.remove()
    assert layouts == [True] * 9
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_static_padding_is_kinetics_i3d_pytorchs_and_equals_same_where_the_stride_divides():
    # hassony2's port pads kernel - stride whatever the size and pools in ceil mode; written here with the
    # torch primitives it uses. Broken on purpose once: pools without ceil mode gave 4 positions, not 5, at T=9.
    assert same_padding((31, 224, 223), (7, 7, 7), (2, 2, 2), static=True) == (2, 3, 2, 3, 2, 3)
    assert same_padding((31, 224, 223), (7, 7, 7), (2, 2, 2)) == (3, 3, 2, 3, 3, 3)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(1, 4, 9, 15, 15))
    unit = Unit3D(4, 8, kernel=(7, 7, 7), stride=(2, 2, 2), use_batch_norm=False, use_bias=True,
                  activation=False, static_padding=True)
    with torch.no_grad():
        expected = unit.conv3d(torch.nn.ConstantPad3d((2, 3, 2, 3, 2, 3), 0.0)(x))
        assert torch.equal(unit(x), expected) and expected.shape[2:] == (4, 7, 7)
    for kernel, stride in (((3, 3, 3), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)), ((2, 2, 2), (2, 2, 2)), ((3, 3, 3), (1, 1, 1))):
        pads = [p for k, s in zip(kernel[::-1], stride[::-1]) for p in (max(k - s, 0) // 2, max(k - s, 0) - max(k - s, 0) // 2)]
        expected = torch.nn.MaxPool3d(kernel, stride, ceil_mode=True)(torch.nn.ConstantPad3d(pads, 0.0)(x))
        assert torch.equal(MaxPool3dSame(kernel, stride, static_padding=True)(x), expected), kernel

    same = inception_i3d(in_channels=2, width_multiplier=1 / 8).eval()
    static = inception_i3d(in_channels=2, width_multiplier=1 / 8, static_padding=True).eval()
    static.load_state_dict(same.state_dict())
    with torch.no_grad():
        even = torch.randn(1, 2, 16, 64, 64)
        assert torch.equal(same.extract_features(even), static.extract_features(even))
        odd = torch.randn(1, 2, 9, 64, 64)
        assert not torch.allclose(same.extract_features(odd), static.extract_features(odd))
