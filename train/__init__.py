"""Train stage: flat full-precision training (quantization-noise injection, SAM, ...), with flatness measured.

    >>> from plateau.train import TrainConfig, train, hessian_trace
    >>> report = train(create_model("small_cnn"), TrainConfig(bits="W4A4", method="gaussian"), "runs/demo")

Methods are registry entries (`register_method`, `get_method`, `list_methods`; see methods.py), the flat-training
ones and the QAT objectives (`--qat`: `QATNet`, `build_qat`, qat.py). The CLI
(`plateau train`) calls `add_arguments(parser)` and `main(args)`.
"""

from .bn import recalibrate_bn
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from .cli import add_arguments, main
from .config import TrainConfig
from .flatness import hessian_trace, measure_flatness, noise_loss_increase, quantized_weights, top_eigenvalue
from .methods import Method, get_method, list_methods, register_method
from .noise import NoiseConfig, NoiseInjector, activation_step, quant_layers, weight_step
from .qat import QATNet, build_qat, qat_quant_config
from .quant_gap import measure_quant_gap
from .trainer import train

__all__ = [
    "TrainConfig",
    "train",
    "QATNet",
    "build_qat",
    "qat_quant_config",
    "Method",
    "register_method",
    "get_method",
    "list_methods",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "add_arguments",
    "main",
    "recalibrate_bn",
    "measure_quant_gap",
    "NoiseConfig",
    "NoiseInjector",
    "weight_step",
    "activation_step",
    "quant_layers",
    "hessian_trace",
    "top_eigenvalue",
    "noise_loss_increase",
    "measure_flatness",
    "quantized_weights",
]
