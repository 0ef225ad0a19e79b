"""U-Mamba_Bot and U-Mamba_Enc for 2D images, in pure PyTorch (arXiv 2401.04722).

Follows bowang-lab/U-Mamba ``umamba/nnunetv2/nets/UMambaBot_2d.py`` and ``UMambaEnc_2d.py``:
residual-conv U-Net (3x3 conv, InstanceNorm(affine), LeakyReLU 0.01, conv bias on; every stage
starts with a block whose skip path is a 1x1 conv, strided from stage 1 on), a stem block at full
resolution, decoder stages that upsample by nearest-neighbour + 1x1 conv, concatenate the skip and
run residual blocks, one 1x1 segmentation head per decoder stage (deep supervision), He init
(a=0.01) on the 2D convs. The Mamba layer flattens (B, C, H, W) row-major into (B, H*W, C), applies
LayerNorm(C) and Mamba, reshapes back, with no residual around it (ours adds one in ``cpu_small``, see
below), in float32 even under autocast.
Bot puts one after the bottleneck stage; Enc after alternate encoder stages (the deepest included),
switching to channel tokens where a stage has no more pixels than channels. The plain baseline
(``resunet_2d``, see :mod:`backend.model.unet`) is this same class with no Mamba layer.

State-dict names mirror U-Mamba's (``encoder.stem``, ``encoder.stages.S.B.conv1``,
``decoder.upsample_layers``, ``decoder.seg_layers``, ``mamba_layer`` for Bot,
``encoder.mamba_layers`` for Enc) so weights trained there can be mapped with little effort.

Deviations from the published code, and why:

- No nnU-Net plans/trainer: the topology comes from a :class:`~backend.model.spec.ModelSpec`.
  Strides are always 1 then 2 (nnU-Net's isotropic 2D plan), kernels always 3x3.
- ``full_resolution_skip``: U-Mamba's decoder never concatenates the full-resolution encoder output
  (its last decoder stage upsamples without a skip). The nnU-Net presets keep that; ``cpu_small``
  turns the skip back on because it already sees frames at half resolution and boundary detail is
  what Dice rewards.
- Decoder upsampling targets the skip's exact size instead of a fixed scale factor (identical for
  the padded inputs the Predictor sends; merely robust otherwise).
- ``forward`` returns only the full-resolution logits; training asks for all heads with
  :meth:`UMamba.forward_deep_supervision` instead of toggling a ``deep_supervision`` attribute.
- ``MambaOptions.residual`` (on in ``cpu_small``, off in the nnU-Net presets): the layer returns
  ``x + Mamba(LayerNorm(x))``, the pre-norm residual form every Mamba language-model block uses,
  instead of U-Mamba's bare ``Mamba(LayerNorm(x))``. The bare form routes the whole bottleneck
  through a randomly initialised Mamba, so at initialisation the network is worse than the same
  U-Net without it; with the residual it starts as that U-Net and Mamba adds sequence context on
  top. No parameter is added, so checkpoints stay interchangeable with ``mamba_ssm.Mamba``; specs
  written before the option existed load as bare. Measured in ``docs/decisions.md``.
- The Mamba layer disables autocast on the input's device type (``torch.autocast``) rather than
  the deprecated ``torch.cuda.amp.autocast`` decorator, so it also stays fp32 under CPU autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.model.mamba import Mamba
from backend.model.spec import (
    ModelSpec,
    channel_token_stages,
    encoder_mamba_stages,
    register_architecture,
    stage_sizes,
)


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation with a per-channel affine, computed as a group norm of one channel per group.

    The same statistics (per sample and channel, biased variance, ``eps`` inside the square root)
    and the same parameters (``weight`` and ``bias`` of ``channels`` entries, no buffers) as
    ``nn.InstanceNorm2d(channels, affine=True)``, so checkpoints saved with either load into
    both. Why not ``nn.InstanceNorm2d``: PyTorch runs it through ``batch_norm`` on a reshaped
    (1, B*C, H, W) view, which is 4x slower than ``group_norm`` at full resolution on the CPU
    and copies channels-last inputs back to contiguous; the ``cpu_small`` forward was 10-13%
    faster with this class alone (docs/benchmarks.md).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=True)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution, ``nn.Conv2d(in_ch, out_ch, 1, stride=stride)`` in parameters and result,
    run as one batched matrix product when that is faster.

    Why: on the CPU, oneDNN's 1x1 convolution of a contiguous (NCHW) tensor with few channels is
    memory-bound and slow: forward + backward of 32 -> 16 channels over 4 x 256 x 288 took 175 ms
    on a 2-core AVX2 EPYC, ``baddbmm`` over the same (B, C, H*W) view 65 ms. The full-resolution
    projections, upsampling convolutions and segmentation heads of a training step are such
    convolutions. Channels-last input (the CPU serving layout, where oneDNN's own 1x1 kernel is
    the matrix product), strided projections and CUDA keep the convolution.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1) or x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return super().forward(x)
        b, c, h, w = x.shape
        weight = self.weight.reshape(1, self.out_channels, c).expand(b, -1, -1)
        flat = x.reshape(b, c, h * w)
        out = torch.bmm(weight, flat) if self.bias is None else torch.baddbmm(self.bias.reshape(1, -1, 1), weight, flat)
        return out.reshape(b, self.out_channels, h, w)


class ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, + skip (1x1 conv when ``project``), act. U-Mamba's BasicResBlock."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, project: bool = False) -> None:
        super().__init__()
        if (in_ch != out_ch or stride != 1) and not project:
            raise ValueError("a block that changes shape needs a projected skip")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm1 = InstanceNorm(out_ch, eps=1e-5)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.norm2 = InstanceNorm(out_ch, eps=1e-5)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)
        self.conv3 = PointwiseConv(in_ch, out_ch, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        skip = self.conv3(x) if self.conv3 is not None else x
        out: torch.Tensor = self.act2(y + skip)
        return out


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    first = ResidualBlock(in_ch, out_ch, stride=stride, project=True)
    return nn.Sequential(first, *[ResidualBlock(out_ch, out_ch) for _ in range(blocks - 1)])


class MambaLayer(nn.Module):
    """LayerNorm + Mamba over the flattened feature map; float32 regardless of autocast.

    ``channel_token``: the sequence runs over channels and each token is the flattened map
    (U-Mamba_Enc's choice for small maps); ``dim`` is then H*W.
    """

    def __init__(
        self, dim: int, *, d_state: int, d_conv: int, expand: int, channel_token: bool = False, residual: bool = False
    ) -> None:
        super().__init__()
        self.dim = dim
        self.channel_token = channel_token
        self.residual = residual
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            b, c, h, w = x.shape
            if self.channel_token:
                if h * w != self.dim:
                    raise ValueError(f"channel-token Mamba layer built for {self.dim} pixels, got {h}x{w}")
                tokens: torch.Tensor = self.mamba(self.norm(x.reshape(b, c, h * w)))
                out = tokens.reshape(b, c, h, w)
            else:
                seq = x.reshape(b, c, h * w).transpose(1, 2)
                out = self.mamba(self.norm(seq)).transpose(1, 2).reshape(b, c, h, w)
            return x + out if self.residual else out


class Encoder(nn.Module):
    """Stem + one residual stage per resolution; returns every stage's output (the skips)."""

    def __init__(self, spec: ModelSpec, mamba_stages: tuple[bool, ...]) -> None:
        super().__init__()
        f = spec.features
        self.stem = _stage(spec.in_channels, f[0], spec.encoder_blocks[0], stride=1)
        self.stages = nn.ModuleList(
            _stage(f[max(s - 1, 0)], f[s], spec.encoder_blocks[s], stride=1 if s == 0 else 2)
            for s in range(spec.n_stages)
        )
        self.mamba_layers: nn.ModuleList | None = None
        if any(mamba_stages):
            tokens = channel_token_stages(spec)
            sizes = stage_sizes(spec, spec.patch_size)
            layers: list[nn.Module] = []
            for s, use in enumerate(mamba_stages):
                if not use:
                    layers.append(nn.Identity())
                    continue
                dim = sizes[s][0] * sizes[s][1] if tokens[s] else f[s]
                layers.append(_mamba_layer(spec, dim, channel_token=tokens[s]))
            self.mamba_layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if self.mamba_layers is not None:
                x = self.mamba_layers[s](x)
            skips.append(x)
        return skips


class Upsample(nn.Module):
    """Nearest-neighbour upsampling and a 1x1 conv to the skip's width (U-Mamba's UpsampleLayer).

    U-Mamba upsamples first and convolves at the skip's resolution. A pointwise convolution
    commutes exactly with nearest-neighbour upsampling (every output pixel is a copy of one input
    pixel, and the convolution maps each pixel alone), so this convolves at the lower resolution
    and then upsamples: the same parameters and the same output (to float32 rounding, test),
    with a quarter of the convolution's work and memory; forward + backward of the
    full-resolution layer went from 261 ms to 25 ms on a 2-core AVX2 EPYC.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = PointwiseConv(in_ch, out_ch)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv(x), size=size, mode="nearest")


class Decoder(nn.Module):
    """Bottleneck-first decoder stages, each with its own segmentation head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        f, n = spec.features, spec.n_stages
        self.full_resolution_skip = spec.full_resolution_skip
        ups, stages, heads = [], [], []
        for s in range(1, n):
            below, skip = f[-s], f[-(s + 1)]
            concat = s < n - 1 or spec.full_resolution_skip
            ups.append(Upsample(below, skip))
            stages.append(_stage(2 * skip if concat else skip, skip, spec.decoder_blocks[s - 1], stride=1))
            heads.append(PointwiseConv(skip, spec.num_classes))
        self.upsample_layers = nn.ModuleList(ups)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor], *, all_heads: bool) -> list[torch.Tensor]:
        """Logits, highest resolution first; only the last head unless ``all_heads``."""
        x = skips[-1]
        outputs: list[torch.Tensor] = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.upsample_layers, self.stages, strict=True)):
            target = skips[-(s + 2)]
            x = up(x, (target.shape[-2], target.shape[-1]))
            if s < last or self.full_resolution_skip:
                x = torch.cat((x, target), dim=1)
            x = stage(x)
            if all_heads or s == last:
                outputs.append(self.seg_layers[s](x))
        return outputs[::-1]


class UMamba(nn.Module):
    """Residual U-Net with optional Mamba layers: ``placement`` is "bottleneck", "encoder" or "none"."""

    def __init__(self, spec: ModelSpec, placement: str) -> None:
        super().__init__()
        if placement not in {"bottleneck", "encoder", "none"}:
            raise ValueError(f"unknown Mamba placement {placement!r}")
        self.spec = spec
        enc_stages = encoder_mamba_stages(spec.n_stages) if placement == "encoder" else (False,) * spec.n_stages
        self.encoder = Encoder(spec, enc_stages)
        self.mamba_layer = (
            _mamba_layer(spec, spec.features[-1], channel_token=False) if placement == "bottleneck" else None
        )
        self.decoder = Decoder(spec)
        self.apply(_init_he)

    def _skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        divisor = self.spec.divisor
        if x.shape[-1] % divisor or x.shape[-2] % divisor:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} must have sides divisible by {divisor}: pad it "
                f"(the Predictor does) to {tuple(math.ceil(v / divisor) * divisor for v in x.shape[-2:])}"
            )
        skips: list[torch.Tensor] = self.encoder(x)
        if self.mamba_layer is not None:
            skips[-1] = self.mamba_layer(skips[-1])
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> full-resolution logits (B, num_classes, H, W)."""
        outputs: list[torch.Tensor] = self.decoder(self._skips(x), all_heads=False)
        return outputs[0]

    def forward_deep_supervision(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every decoder head, full resolution first (n_stages - 1 tensors)."""
        outputs: list[torch.Tensor] = self.decoder(self._skips(x), all_heads=True)
        return outputs


def _mamba_layer(spec: ModelSpec, dim: int, *, channel_token: bool) -> MambaLayer:
    m = spec.mamba
    return MambaLayer(
        dim, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, channel_token=channel_token, residual=m.residual
    )


def _init_he(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2): only 2D convs; Mamba keeps its own init."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_architecture("umamba_bot_2d")
def build_umamba_bot(spec: ModelSpec) -> nn.Module:
    return UMamba(spec, "bottleneck")


@register_architecture("umamba_enc_2d")
def build_umamba_enc(spec: ModelSpec) -> nn.Module:
    return UMamba(spec, "encoder")
