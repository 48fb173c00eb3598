"""Train stage: noise-injected flat full-precision training, with flatness measured.

    >>> from plateau.train import TrainConfig, train, hessian_trace
    >>> report = train(create_model("small_cnn"), TrainConfig(bits="W4A4", noise="gaussian"), "runs/demo")

The CLI (`plateau train`) calls `add_arguments(parser)` and `main(args)`.
"""

from .cli import add_arguments, main
from .flatness import hessian_trace, measure_flatness, noise_loss_increase, quantized_weights, top_eigenvalue
from .noise import NoiseConfig, NoiseInjector, activation_step, quant_layers, weight_step
from .trainer import METHODS, TrainConfig, train

__all__ = [
    "METHODS",
    "TrainConfig",
    "train",
    "add_arguments",
    "main",
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
