"""Model specs, presets and networks: shapes per preset, tiny forward passes, registry errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.errors import InvalidInput
from backend.model.networks import build_model
from backend.model.spec import (
    PRESETS,
    MambaOptions,
    ModelSpec,
    Normalization,
    accepts_any_size,
    channel_token_stages,
    encoder_mamba_stages,
    preset_spec,
)
from backend.model.umamba import MambaLayer

torch.set_num_threads(1)
CLASSES = ("Nerve", "Vessel")


def tiny(arch: str, **kw: object) -> ModelSpec:
    base = ModelSpec(
        arch=arch,
        classes=CLASSES,
        features=(4, 8, 16),
        encoder_blocks=(1, 2, 1),
        decoder_blocks=(2, 1),
        patch_size=(16, 16),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_the_documented_topology(name: str) -> None:
    spec = preset_spec(name, CLASSES)
    model = build_model(spec)
    state = model.state_dict()
    n = spec.n_stages
    assert state["encoder.stem.0.conv1.weight"].shape == (spec.features[0], 1, 3, 3)
    assert state[f"encoder.stages.{n - 1}.0.conv1.weight"].shape == (spec.features[-1], spec.features[-2], 3, 3)
    heads = [k for k in state if k.startswith("decoder.seg_layers.") and k.endswith(".weight")]
    assert len(heads) == n - 1
    assert state[f"decoder.seg_layers.{n - 2}.weight"].shape == (3, spec.features[0], 1, 1)
    has_bot = any(k.startswith("mamba_layer.") for k in state)
    has_enc = any(k.startswith("encoder.mamba_layers.") for k in state)
    assert has_bot == (spec.arch == "umamba_bot_2d")
    assert has_enc == (spec.arch == "umamba_enc_2d")
    if has_bot:  # one Mamba on the bottleneck width, mamba_ssm parameter layout
        assert state["mamba_layer.mamba.in_proj.weight"].shape == (4 * spec.features[-1], spec.features[-1])
        assert state["mamba_layer.mamba.A_log"].shape == (2 * spec.features[-1], 16)


def test_nnunet_presets_follow_the_published_2d_plan() -> None:
    spec = preset_spec("nnunet_bot", CLASSES)
    assert spec.features == (32, 64, 128, 256, 512, 512, 512, 512)
    assert spec.patch_size == (512, 512) and spec.input_scale == 1.0
    assert spec.encoder_blocks == (2, 2, 2, 2, 1, 1, 1, 1)
    assert spec.decoder_blocks == (2, 2, 2, 2, 1, 1, 1)
    assert spec.divisor == 128


def test_nnunet_enc_places_mamba_on_alternate_stages_with_channel_tokens_deep() -> None:
    spec = preset_spec("nnunet_enc", CLASSES)
    assert encoder_mamba_stages(8) == (False, True, False, True, False, True, False, True)
    # 512 / 2**5 = 16 -> 256 pixels <= 512 channels: channel tokens from stage 5 on.
    assert channel_token_stages(spec)[5] and channel_token_stages(spec)[7] and not channel_token_stages(spec)[3]
    state = build_model(spec).state_dict()
    assert state["encoder.mamba_layers.1.norm.weight"].shape == (64,)  # pixel tokens, d_model = channels
    assert state["encoder.mamba_layers.5.norm.weight"].shape == (256,)  # channel tokens, d_model = 16*16
    assert state["encoder.mamba_layers.7.norm.weight"].shape == (16,)  # 4*4
    assert not accepts_any_size(spec)
    assert accepts_any_size(preset_spec("nnunet_bot", CLASSES))


@pytest.mark.parametrize("arch", ["umamba_bot_2d", "umamba_enc_2d", "resunet_2d"])
@pytest.mark.parametrize("full_skip", [False, True])
def test_tiny_forward_shapes_and_deep_supervision(arch: str, full_skip: bool) -> None:
    spec = tiny(arch, full_resolution_skip=full_skip)
    model = build_model(spec).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = model(x)
        heads = model.forward_deep_supervision(x)
    assert out.shape == (2, 3, 16, 16)
    assert [tuple(h.shape[-2:]) for h in heads] == [(16, 16), (8, 8)]
    torch.testing.assert_close(heads[0], out)


def test_size_not_divisible_fails_with_a_padding_hint() -> None:
    model = build_model(tiny("umamba_bot_2d")).eval()
    with pytest.raises(ValueError, match=r"divisible by 4.*\(20, 16\)"):
        model(torch.randn(1, 1, 18, 16))


def test_mamba_layer_stays_float32_under_autocast() -> None:
    layer = MambaLayer(8, d_state=4, d_conv=4, expand=2)
    x = torch.randn(1, 8, 4, 4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.float32 and y.shape == x.shape


def test_residual_mamba_layer_adds_its_input_and_keeps_the_mamba_ssm_parameters() -> None:
    torch.manual_seed(0)
    bare = MambaLayer(8, d_state=4, d_conv=4, expand=2)
    res = MambaLayer(8, d_state=4, d_conv=4, expand=2, residual=True)
    assert res.state_dict().keys() == bare.state_dict().keys()
    res.load_state_dict(bare.state_dict())
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(res(x), x + bare(x))
        assert not torch.allclose(bare(x), x + bare(x))


def test_spec_without_the_residual_key_loads_as_the_published_bare_layer() -> None:
    """Checkpoints written before ``MambaOptions.residual`` existed must rebuild what they trained."""
    spec = tiny("umamba_bot_2d", mamba=MambaOptions(residual=True))
    raw = json.loads(spec.to_json())
    assert raw["mamba"].pop("residual") is True
    old = ModelSpec.from_json(json.dumps(raw))
    assert old.mamba.residual is False and ModelSpec.from_json(spec.to_json()) == spec
    assert build_model(old).mamba_layer.residual is False
    assert build_model(spec).mamba_layer.residual is True


def test_unknown_arch_and_preset_fail_loudly() -> None:
    with pytest.raises(InvalidInput, match="unknown architecture 'vit'.*umamba_bot_2d"):
        build_model(tiny("vit"))
    with pytest.raises(InvalidInput, match="unknown model preset 'huge'"):
        preset_spec("huge", CLASSES)


def test_spec_json_round_trip_and_validation() -> None:
    spec = tiny("umamba_enc_2d", normalization=Normalization("zscore_dataset", mean=60.0, std=20.0), input_scale=0.5)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.class_names == ("background", "Nerve", "Vessel") and spec.num_classes == 3
    with pytest.raises(InvalidInput, match="decoder_blocks"):
        tiny("umamba_bot_2d", decoder_blocks=(1,))
    with pytest.raises(InvalidInput, match="divisible by 4"):
        tiny("umamba_bot_2d", patch_size=(18, 16))
    with pytest.raises(InvalidInput, match="distinct"):
        tiny("umamba_bot_2d", classes=("a", "a"))
    with pytest.raises(InvalidInput, match="malformed"):
        ModelSpec.from_json('{"arch": "x"}')


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 12),
    batch=st.integers(1, 3),
    side=st.integers(3, 9),  # a 1x2 map of two near-equal values is all eps: both forms round differently
    scale=st.floats(1e-3, 1e3),
    channels_last=st.booleans(),
)
def test_instance_norm_matches_torch_instance_norm_and_loads_its_parameters(
    channels: int, batch: int, side: int, scale: float, channels_last: bool
) -> None:
    """The group-norm form is the same function with the same state dict as nn.InstanceNorm2d
    (checkpoints saved before the switch load unchanged), in both memory formats."""
    from backend.model.umamba import InstanceNorm

    torch.manual_seed(channels * 31 + side)
    reference = torch.nn.InstanceNorm2d(channels, eps=1e-5, affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    ours = InstanceNorm(channels, eps=1e-5)
    ours.load_state_dict(reference.state_dict())
    assert set(ours.state_dict()) == set(reference.state_dict()) == {"weight", "bias"}
    x = torch.randn(batch, channels, side, side + 1) * scale + scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    in_ch=st.integers(1, 9),
    out_ch=st.integers(1, 9),
    batch=st.integers(1, 3),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    stride=st.sampled_from([1, 2]),
    channels_last=st.booleans(),
)
def test_pointwise_conv_is_a_1x1_conv2d_with_its_state_dict(
    in_ch: int, out_ch: int, batch: int, height: int, width: int, stride: int, channels_last: bool
) -> None:
    """The matrix-product form gives nn.Conv2d's result and gradients with nn.Conv2d's state dict
    (checkpoints saved before the switch load unchanged), in both memory formats and strides."""
    from backend.model.umamba import PointwiseConv

    torch.manual_seed(in_ch * 13 + out_ch)
    reference = torch.nn.Conv2d(in_ch, out_ch, 1, stride=stride)
    ours = PointwiseConv(in_ch, out_ch, stride=stride)
    ours.load_state_dict(reference.state_dict())
    assert set(ours.state_dict()) == set(reference.state_dict()) == {"weight", "bias"}
    x = torch.randn(batch, in_ch, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ours = reference(x_ref), ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out_ref)
    out_ref.backward(upstream)
    out_ours.backward(upstream)
    assert ours.weight.grad is not None and reference.weight.grad is not None
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    in_ch=st.integers(1, 8),
    out_ch=st.integers(1, 8),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    up_h=st.integers(1, 3),
    up_w=st.integers(1, 3),
    extra=st.integers(0, 1),
)
def test_upsample_convolving_first_is_upsampling_then_convolving(
    in_ch: int, out_ch: int, height: int, width: int, up_h: int, up_w: int, extra: int
) -> None:
    """U-Mamba's order (nearest upsampling, then the 1x1 conv) and ours (the conv at the lower
    resolution, then upsampling) give the same output to float32 rounding, also for a target size that is
    not a whole multiple (odd skip sizes)."""
    from backend.model.umamba import Upsample

    torch.manual_seed(in_ch * 7 + out_ch)
    layer = Upsample(in_ch, out_ch)
    x = torch.randn(2, in_ch, height, width)
    size = (height * up_h + extra, width * up_w)
    upsampled = torch.nn.functional.interpolate(x, size=size, mode="nearest")
    with torch.no_grad():
        reference = torch.nn.functional.conv2d(upsampled, layer.conv.weight, layer.conv.bias)
        ours = layer(x, size)
    assert ours.shape == reference.shape == (2, out_ch, *size)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
