"""How a model is quantized: bit widths, calibration and rounding choices, checked when built.

Every field that is a `plateau export` option says so itself (plateau.config_cli): the CLI is derived from here.
Method names are checked against their registries: calibrators (plateau/calibrators.py) and rounding methods
(ROUNDINGS: round to nearest here; learned rounding is registered by plateau.export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from plateau.calibrators import ACT_CALIBRATORS, WEIGHT_CALIBRATORS
from plateau.config_cli import check_ranges, setting
from plateau.errors import PlateauError
from plateau.quant import QType, parse_bits
from plateau.registry import Registry

__all__ = ["QuantConfig", "ROUNDINGS", "RECONSTRUCTIONS"]

# rounding method name -> the function replacing round-to-nearest weights (see plateau.export.rounding)
ROUNDINGS: Registry[Callable] = Registry("rounding")
ROUNDINGS.add("nearest", lambda graph, acts, weights, calib, cfg, progress=False: (weights, acts))
RECONSTRUCTIONS = ("layer", "block")  # what learned rounding reconstructs at once: one layer, or one block


@dataclass
class QuantConfig:
    """How a model is quantized.

    >>> QuantConfig.from_bits("W4A8", act_calibration="mse", rounding="adaround")
    """

    weight_bits: int = 8
    act_bits: int = 8
    act_signed: bool = setting(True, "uint8 activations (default int8)", flags=("--act-unsigned",))
    act_calibration: str = setting("minmax", "activation clipping range", choices=ACT_CALIBRATORS.names)
    weight_calibration: str = setting("minmax", "weight scales", choices=WEIGHT_CALIBRATORS.names)
    percentile: float = 99.99
    keep_first_last_8bit: bool = setting(False, "first and last layer at 8 bits")
    layer_bits: dict[str, int] = field(default_factory=dict)  # module path -> weight bits (mixed precision)
    rounding: str = setting("nearest", "adaround: learned rounding", choices=ROUNDINGS.names)
    calib_images: int = setting(512, "calibration images from the train split", minimum=1)
    adaround_iters: int = setting(500, "learned-rounding steps per layer or block", minimum=1)
    adaround_batch: int = 32
    adaround_act_quant: bool = True  # QDrop-style: quantized activations inside the reconstruction
    reconstruction: str = setting("layer", "learned rounding per conv/linear layer (AdaRound) or per block (BRECQ: "
                                 "a residual block reconstructed as one)", choices=RECONSTRUCTIONS)
    learn_act_clip: bool = setting(False, "with --rounding adaround: learn the activation clipping ranges (scales) "
                                  "as well")
    allow_float: bool = setting(False, "keep ops with no integer form (GELU, Softmax, LayerNorm, ...) in float "
                               "between DequantizeLinear and QuantizeLinear, listed in the report")
    act_bits_scope: str = setting("kernel-inputs", "which activations get --bits' activation width: those an "
                                  "integer conv/linear/matmul/average reads (the rest, e.g. a transformer's residual "
                                  "stream, 8-bit), or all", choices=("kernel-inputs", "all"))
    probability_bits: int = setting(8, "bits of attention probabilities (Softmax outputs)")
    integer_only: bool = setting(False, "LayerNorm, Softmax and GELU (any float op) in integer arithmetic too: "
                                 "lookup tables, integer exp sums and an integer square root, no float island")
    exact_islands: bool = setting(True, "keep GELU, Softmax and LayerNorm as float32 ops (onnxruntime's own "
                                  "kernels) instead of their exact forms: GELU as the lookup table of its island, "
                                  "Softmax and LayerNorm in float64 from exact integer sums, so that every engine "
                                  "computes the reference's integers (plateau/ops/exact_islands.py)")
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "probability_bits"):
            b = getattr(self, name)
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise PlateauError(f"{name} must be an integer in 2..8, got {b!r}")
        ACT_CALIBRATORS.get(self.act_calibration)
        WEIGHT_CALIBRATORS.get(self.weight_calibration)
        ROUNDINGS.get(self.rounding)
        if self.reconstruction not in RECONSTRUCTIONS:
            raise PlateauError(f"unknown reconstruction {self.reconstruction!r}: choose from "
                               f"{', '.join(RECONSTRUCTIONS)}")
        if self.learn_act_clip and self.rounding == "nearest":
            raise PlateauError("learned activation clipping runs inside learned rounding: add --rounding adaround")
        if not 50.0 < self.percentile <= 100.0:
            raise PlateauError(f"percentile must be in (50, 100], got {self.percentile}")
        check_ranges(self)  # --calib-images must be >= 1, got 0
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

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> QuantConfig:
        """A config from a manifest or reference file (keys it does not know are ignored), then `overrides`."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in names}, **overrides})

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
