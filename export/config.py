"""The export configuration: bit widths, calibration and rounding choices, checked when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from plateau.errors import PlateauError
from plateau.quant import QType, parse_bits

__all__ = ["QuantConfig", "ACT_CALIBRATIONS", "WEIGHT_CALIBRATIONS", "ROUNDINGS", "RECONSTRUCTIONS"]

ACT_CALIBRATIONS = ("minmax", "percentile", "mse", "kl")
WEIGHT_CALIBRATIONS = ("minmax", "mse")
ROUNDINGS = ("nearest", "adaround")
RECONSTRUCTIONS = ("layer", "block")


@dataclass
class QuantConfig:
    """How a model is quantized.

    >>> QuantConfig.from_bits("W4A8", act_calibration="mse", rounding="adaround")
    """

    weight_bits: int = 8
    act_bits: int = 8
    act_signed: bool = True  # int8 x int8 suits ARM sdot; uint8 activations need i8mm's usdot
    act_calibration: str = "minmax"
    weight_calibration: str = "minmax"
    percentile: float = 99.99
    keep_first_last_8bit: bool = False
    layer_bits: dict[str, int] = field(default_factory=dict)  # module path -> weight bits (mixed precision)
    rounding: str = "nearest"
    calib_images: int = 512
    adaround_iters: int = 500
    adaround_batch: int = 32
    adaround_act_quant: bool = True  # QDrop-style: quantized activations inside the reconstruction
    reconstruction: str = "layer"  # learned rounding per conv/linear layer (AdaRound) or per block (BRECQ)
    learn_act_clip: bool = False  # learn the activation scales (clipping ranges) during the reconstruction
    allow_float: bool = False  # ops with no integer form (GELU, Softmax, ...) stay float islands between DQ and Q
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            b = getattr(self, name)
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise PlateauError(f"{name} must be an integer in 2..8, got {b!r}")
        if self.act_calibration not in ACT_CALIBRATIONS:
            raise PlateauError(f"unknown activation calibration {self.act_calibration!r}: "
                               f"choose from {', '.join(ACT_CALIBRATIONS)}")
        if self.weight_calibration not in WEIGHT_CALIBRATIONS:
            raise PlateauError(f"unknown weight calibration {self.weight_calibration!r}: "
                               f"choose from {', '.join(WEIGHT_CALIBRATIONS)}")
        if self.rounding not in ROUNDINGS:
            raise PlateauError(f"unknown rounding {self.rounding!r}: choose from {', '.join(ROUNDINGS)}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise PlateauError(f"unknown reconstruction {self.reconstruction!r}: choose from {', '.join(RECONSTRUCTIONS)}")
        if self.learn_act_clip and self.rounding != "adaround":
            raise PlateauError("learned activation clipping runs inside learned rounding: add --rounding adaround")
        if not 50.0 < self.percentile <= 100.0:
            raise PlateauError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calib_images < 1:
            raise PlateauError(f"calib_images must be positive, got {self.calib_images}")
        for k, b in self.layer_bits.items():
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise PlateauError(f"layer_bits[{k!r}] must be an integer in 2..8, got {b!r}")

    @classmethod
    def from_bits(cls, bits: str, **kw) -> QuantConfig:
        try:
            w, a = parse_bits(bits)
        except ValueError as e:
            raise PlateauError(str(e)) from None
        return cls(weight_bits=w, act_bits=a, **kw)

    @property
    def bits_name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    def act_qtype(self, bits: int | None = None) -> QType:
        return QType(bits or self.act_bits, signed=self.act_signed)

    def weight_qtype(self, bits: int | None = None) -> QType:
        # Symmetric narrow range: -127..127 at 8 bits, -7..7 at 4 bits.
        return QType(bits or self.weight_bits, signed=True, narrow=True)

    def to_dict(self) -> dict:
        return asdict(self)
