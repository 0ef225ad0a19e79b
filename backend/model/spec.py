"""What a checkpoint must carry to rebuild its network and preprocess its input: :class:`ModelSpec`.

A spec is frozen and JSON-serialisable. It travels inside every checkpoint (and the model_version
row), so serving reads it and never re-derives it from code defaults that may have changed since.
Networks are built only through :func:`build_model`, which looks the architecture up in a registry
and fails loudly on an unknown name (the timm ``create_model`` pattern).

Presets (:data:`PRESETS`; ``nnunet_unet`` and ``cpu_small_unet`` are the same networks without Mamba):

``nnunet_bot`` / ``nnunet_enc``
    What nnU-Net v2's planner produces for 2D 512x512 single-channel frames, as U-Mamba consumes
    it: 8 stages (7 stride-2 downsamplings, because nnU-Net stops when the bottleneck edge reaches
    4 px: 512 / 2**7 = 4), 3x3 kernels everywhere, features 32 doubling to the 512 cap
    (32, 64, 128, 256, 512, 512, 512, 512), patch 512x512 at native resolution. The plain plans
    give 2 convs per stage; U-Mamba turns those into residual blocks and then forces 1 block in the
    deeper half of the encoder and the upper half of the decoder (``encoder_blocks`` 2,2,2,2,1,1,1,1
    and ``decoder_blocks`` 2,2,2,2,1,1,1, listed bottleneck-first), which we copy.

``cpu_small`` (serving default) / ``cpu_small_unet`` (its plain baseline)
    Sized for 2 CPU threads: frames are resampled by ``input_scale`` 0.5 (512 -> 256; a nerve
    still covers ~2,000 px there on average) before the network and the probabilities are
    resampled back, so a 512x512 frame costs a 256x256 forward. 6 stages with features 16, 32, 64, 128, 256, 256
    (bottleneck 8x8: a 64-token Mamba sequence, with a residual around the Mamba layer: see
    :class:`MambaOptions`), one block in the full-resolution encoder stage
    instead of two (full-resolution convs dominate CPU time) and the full-resolution skip connection
    restored (see ``full_resolution_skip``). Training patches are 256x256 on the resampled grid
    (whole 512x512 frames, crops of larger ones). Measured on the 2-core dev machine
    (``bench/bench_inference.py``, best of 15, 2026-12-02): a 512x512 frame end to end in 62 ms with
    the CPU's native bfloat16 (the Predictor default), 95 ms in float32, 80-94 ms on AVX2-only
    kernels (no bfloat16); the 150 ms budget holds on both kinds of CPU.
    Base widths 24 or 32 instead of 16 cost about 1.7x and 2.3x the inference time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from backend.errors import InvalidInput

if TYPE_CHECKING:
    from torch import nn

NORMALIZATION_SCHEMES = ("zscore_image", "zscore_dataset")


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation applied after resampling, before the network.

    ``zscore_image`` (default, nnU-Net's choice for non-CT data): each frame is standardised by its
    own mean and std, which cancels the gain and dynamic-range knobs that differ between ultrasound
    machines and sonographers. ``zscore_dataset`` uses the stored ``mean``/``std`` instead.
    """

    scheme: str = "zscore_image"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.scheme not in NORMALIZATION_SCHEMES:
            raise InvalidInput(f"unknown normalisation {self.scheme!r}; known: {', '.join(NORMALIZATION_SCHEMES)}")
        if not self.std > 0:
            raise InvalidInput(f"normalisation std must be > 0, got {self.std}")


@dataclass(frozen=True)
class MambaOptions:
    """Mamba block hyper-parameters (U-Mamba uses mamba_ssm defaults: 16, 4, 2).

    ``residual``: the layer returns ``x + Mamba(LayerNorm(x))`` (the pre-norm residual form of every
    Mamba language-model block) instead of U-Mamba's bare ``Mamba(LayerNorm(x))``. It adds no
    parameter, so checkpoints stay interchangeable with ``mamba_ssm.Mamba``; see ``cpu_small``.
    """

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    residual: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Architecture, class map and preprocessing of one segmentation model.

    ``classes`` are the foreground label names: mask value ``i`` (1-based) is ``classes[i - 1]``,
    0 is background, so the network has ``len(classes) + 1`` outputs. ``features``,
    ``encoder_blocks`` are per resolution stage (stage 0 is full resolution, every later stage halves
    it); ``decoder_blocks`` has one entry per decoder stage, bottleneck-first, as in U-Mamba.
    ``patch_size`` is the training patch in network pixels (after ``input_scale``), (height, width).
    """

    arch: str
    classes: tuple[str, ...]
    features: tuple[int, ...]
    encoder_blocks: tuple[int, ...]
    decoder_blocks: tuple[int, ...]
    patch_size: tuple[int, int]
    input_scale: float = 1.0
    in_channels: int = 1
    full_resolution_skip: bool = False
    normalization: Normalization = field(default_factory=Normalization)
    mamba: MambaOptions = field(default_factory=MambaOptions)

    def __post_init__(self) -> None:
        n = len(self.features)
        if n < 2:
            raise InvalidInput(f"a U-Net needs at least 2 stages, got features={self.features}")
        if len(self.encoder_blocks) != n:
            raise InvalidInput(f"encoder_blocks needs {n} entries (one per stage), got {self.encoder_blocks}")
        if len(self.decoder_blocks) != n - 1:
            raise InvalidInput(f"decoder_blocks needs {n - 1} entries, got {self.decoder_blocks}")
        if min(self.features) < 1 or min(self.encoder_blocks) < 1 or min(self.decoder_blocks) < 1:
            raise InvalidInput("features and block counts must be positive")
        if not self.classes or len(set(self.classes)) != len(self.classes) or any(not c for c in self.classes):
            raise InvalidInput(f"classes must be distinct non-empty names, got {self.classes}")
        if len(self.patch_size) != 2 or any(p % self.divisor for p in self.patch_size):
            raise InvalidInput(f"patch_size {self.patch_size} must be 2 sides divisible by {self.divisor}")
        if not 0 < self.input_scale <= 4:
            raise InvalidInput(f"input_scale must be in (0, 4], got {self.input_scale}")

    @property
    def num_classes(self) -> int:
        """Network outputs, background included."""
        return len(self.classes) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names indexed by mask value: ``("background", *classes)``."""
        return ("background", *self.classes)

    @property
    def n_stages(self) -> int:
        return len(self.features)

    @property
    def divisor(self) -> int:
        """Network input sides must be multiples of this (one stride-2 step per stage after 0)."""
        return 1 << (len(self.features) - 1)

    def with_classes(self, classes: tuple[str, ...]) -> ModelSpec:
        return _replace(self, classes=tuple(classes))

    def with_normalization(self, normalization: Normalization) -> ModelSpec:
        return _replace(self, normalization=normalization)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parse :meth:`to_json` output; raises :class:`InvalidInput` on anything malformed."""
        try:
            raw = json.loads(text)
            return cls(
                arch=str(raw["arch"]),
                classes=tuple(str(c) for c in raw["classes"]),
                features=tuple(int(v) for v in raw["features"]),
                encoder_blocks=tuple(int(v) for v in raw["encoder_blocks"]),
                decoder_blocks=tuple(int(v) for v in raw["decoder_blocks"]),
                patch_size=(int(raw["patch_size"][0]), int(raw["patch_size"][1])),
                input_scale=float(raw["input_scale"]),
                in_channels=int(raw["in_channels"]),
                full_resolution_skip=bool(raw["full_resolution_skip"]),
                normalization=Normalization(**raw["normalization"]),
                mamba=MambaOptions(**raw["mamba"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInput(f"malformed model spec: {exc}") from exc


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def stage_sizes(spec: ModelSpec, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Feature-map (height, width) of every stage for a network input of ``size``."""
    h, w = size
    out = []
    for s in range(spec.n_stages):
        out.append((h // 2**s, w // 2**s))
    return out


def channel_token_stages(spec: ModelSpec) -> tuple[bool, ...]:
    """Per stage, whether U-Mamba_Enc would scan channels instead of pixels there.

    U-Mamba_Enc switches a stage's Mamba layer to "channel tokens" when the training feature map
    has no more pixels than channels; its ``d_model`` is then the pixel count, which ties the network
    to the training patch size. Only meaningful for ``umamba_enc_2d``.
    """
    sizes = stage_sizes(spec, spec.patch_size)
    return tuple(h * w <= c for (h, w), c in zip(sizes, spec.features, strict=True))


def encoder_mamba_stages(n_stages: int) -> tuple[bool, ...]:
    """U-Mamba_Enc's placement: alternate stages, chosen so that the deepest stage has one."""
    return tuple(bool(s % 2) ^ bool(n_stages % 2) for s in range(n_stages))


def accepts_any_size(spec: ModelSpec) -> bool:
    """False when the network only runs on ``patch_size`` inputs (Enc with channel-token stages)."""
    if spec.arch != "umamba_enc_2d":
        return True
    mamba = encoder_mamba_stages(spec.n_stages)
    return not any(m and c for m, c in zip(mamba, channel_token_stages(spec), strict=True))


# -- architecture registry ---------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[[ModelSpec], nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[[ModelSpec], nn.Module]], Callable[[ModelSpec], nn.Module]]:
    """Decorator: make ``factory(spec) -> nn.Module`` buildable as ``spec.arch == name``."""

    def deco(factory: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not factory:
            raise ValueError(f"architecture {name!r} registered twice")
        ARCHITECTURES[name] = factory
        return factory

    return deco


# -- presets -----------------------------------------------------------------------------------


def _nnunet_2d_512(arch: str, classes: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        arch=arch,
        classes=classes,
        features=(32, 64, 128, 256, 512, 512, 512, 512),
        encoder_blocks=(2, 2, 2, 2, 1, 1, 1, 1),
        decoder_blocks=(2, 2, 2, 2, 1, 1, 1),
        patch_size=(512, 512),
        input_scale=1.0,
        full_resolution_skip=False,
    )


def _cpu_small(arch: str, classes: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        arch=arch,
        classes=classes,
        features=(16, 32, 64, 128, 256, 256),
        encoder_blocks=(1, 2, 2, 1, 1, 1),
        decoder_blocks=(2, 2, 2, 1, 1),
        patch_size=(256, 256),
        input_scale=0.5,
        full_resolution_skip=True,
        mamba=MambaOptions(residual=True),
    )


PRESETS: dict[str, Callable[[tuple[str, ...]], ModelSpec]] = {
    "nnunet_bot": lambda classes: _nnunet_2d_512("umamba_bot_2d", classes),
    "nnunet_enc": lambda classes: _nnunet_2d_512("umamba_enc_2d", classes),
    "nnunet_unet": lambda classes: _nnunet_2d_512("resunet_2d", classes),
    "cpu_small": lambda classes: _cpu_small("umamba_bot_2d", classes),
    "cpu_small_unet": lambda classes: _cpu_small("resunet_2d", classes),
}


def preset_spec(name: str, classes: tuple[str, ...] | list[str]) -> ModelSpec:
    """The spec of preset ``name`` for these foreground classes; unknown names fail loudly."""
    factory = PRESETS.get(name)
    if factory is None:
        raise InvalidInput(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return factory(tuple(classes))
