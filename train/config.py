"""The settings of a training run: one dataclass, the single source of defaults, validation and CLI options.

Each field's metadata (see `setting`) holds its help text, and where it has them its choices, option names
and CLI-only default; `cli.py` derives the `plateau train` options from these fields. A new setting is one
field here. The config is saved in every checkpoint and in the manifest; `from_dict` reads the older key
names too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from plateau.config_cli import check_ranges, field_choices, setting

from .methods import Method, get_method, list_methods
from .noise import NOISE_TARGETS, NoiseConfig

__all__ = ["TrainConfig", "FLATNESS_MODES", "OPTIMIZERS", "RENAMED_KEYS", "setting", "field_choices"]

FLATNESS_MODES = ("epoch", "end", "off")
OPTIMIZERS = ("sgd", "adamw")
# Older checkpoints and manifests carry these keys: old name -> today's field.
RENAMED_KEYS = {"noise": "method", "first_last_8bit": "keep_first_last_8bit"}


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in every checkpoint and in the manifest)."""

    data: str = setting("synthetic", "ImageFolder tree with train/ and test/, or 'synthetic'")
    epochs: int = setting(10, "training epochs", minimum=1)
    batch_size: int = setting(128, "global batch size: with W processes each takes batch_size // W", minimum=1)
    lr: float = setting(0.1, "peak learning rate (default 0.1 from scratch, 0.01 fine-tuning and QAT, 0.001 QAT "
                        "with BatchNorm frozen; AdamW: a hundredth of these, 3e-4 for QAT with BatchNorm frozen)",
                        cli_default=None, minimum=0, above=True)
    optimizer: str = setting("sgd", "SGD with momentum (nesterov) or AdamW", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD momentum, nesterov when > 0", minimum=0, maximum=0.999)
    weight_decay: float = setting(5e-4, "weight decay of Conv/Linear weights; none on BN and biases", minimum=0)
    warmup_epochs: float = setting(1.0, "linear LR warm-up (default 1 from scratch, 0 fine-tuning)",
                                   cli_default=None, minimum=0)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", minimum=0, maximum=0.99)
    bits: str = setting("W8A8", "target precision, e.g. W8A8, W4A8, W4A4")
    method: str = setting("gaussian", "flat-training method, a plateau.train.methods entry",
                          choices=list_methods, flags=("--method", "--noise"), cli_default=None)
    alpha: float = setting(1.0, "noise std as a multiple of step/sqrt(12)", minimum=0)
    noise_target: str = setting("both", "what gets the noise", choices=NOISE_TARGETS)
    noise_p: float = setting(0.5, "fraction of elements perturbed per step, for quantnoise", minimum=0,
                             maximum=1, above=True)
    rho: float = setting(0.05, "SAM radius", minimum=0)
    qat: bool = setting(False, "quantization-aware training at --bits from --checkpoint, in the reference "
                        "numerics (methods lsq, fpq, cr, mec, ti; default lsq); export writes its learned scales")
    kd: float = setting(0.0, "weight of distillation from the FP model's logits (QAT: the model being quantized; "
                        "flat methods: the --checkpoint training starts from)", minimum=0)
    range_grad: bool = setting(False, "the noise's step takes gradient: the loss pays for the weight and activation "
                               "ranges that set it (their outliers), as min-max PTQ will (flat methods with noise)")
    probability_bits: int = setting(8, "bits of the noise on attention probabilities (Softmax outputs): 8, the "
                                    "grid export keeps them on; the activation width of --bits prepares for a PTQ "
                                    "that quantizes them with the rest", minimum=2, maximum=8)
    qat_weight: float = setting(1.0, "QAT: weight of the method's own term (fpq, cr, mec, ti)", minimum=0)
    feature_noise: float = setting(0.1, "fpq: std of the multiplicative noise on block outputs", minimum=0)
    qat_bn_freeze: float | None = setting(None, "QAT: the fraction of the run after which each BatchNorm is frozen "
                                          "into the folded form export writes (trained on batch statistics "
                                          "before; 0: frozen throughout; default 0.8 at 2 bits, 0 above: the best "
                                          "measured, docs/qat.md)", minimum=0, maximum=1)
    intervention: float = setting(0.5, "ti: fraction of the run over which the teacher's block outputs are "
                                  "released", minimum=0, maximum=1)
    keep_first_last_8bit: bool = setting(False, "keep the first and last layer at 8 bits",
                                         flags=("--keep-first-last-8bit", "--first-last-8bit"))
    seed: int = setting(0, "seeds initialization, data order and noise", minimum=0)
    resume: bool = setting(False, "continue from RUN/train/last.pt (or the newest checkpoint-epochNNN.pt)")
    overwrite: bool = setting(False, "start over in a RUN/train that holds an earlier run, deleting its "
                              "checkpoints")
    flatness: str = setting("end", "when to measure flatness", choices=FLATNESS_MODES)
    flatness_images: int = setting(512, "train images of the fixed flatness subset", minimum=1)
    trace_samples: int = setting(8, "Hutchinson vectors", minimum=1)
    eig_iters: int = setting(10, "power iterations, 0 skips", minimum=0)
    mc_samples: int = setting(4, "Monte Carlo noise draws, 0 skips", minimum=0)
    train_limit: int | None = setting(None, "training images per epoch, for quick runs", minimum=1)
    eval_limit: int | None = setting(None, "test images per evaluation", minimum=1)
    calib_images: int = setting(512, "PTQ calibration images (train split) for the quantization gap", minimum=1)
    quant_gap: bool = setting(True, "do not measure FP vs PTQ top-1 (round to nearest) at the end")
    img_size: int | None = setting(None, "the model's input size (a timm ViT is built for it); ImageFolder images "
                                         "are resized to it", minimum=8, maximum=4096)
    augment: bool = setting(True, "no training augmentation: random crop and flip")
    bn_recalibrate: int = setting(2048, "train images re-estimating BatchNorm statistics without noise "
                                  "after the last epoch, 0 turns it off", minimum=0)
    device: str = setting("cpu", "where training runs: this machine's CPU, or its CUDA GPU (one per process "
                          "under torchrun)", choices=("cpu", "cuda"))
    threads: int | None = setting(None, "torch threads per process", minimum=1)
    progress: bool = setting(True, "no progress bars")

    def __post_init__(self) -> None:
        for f in fields(self):
            valid, value = field_choices(f), getattr(self, f.name)
            if valid is not None and value not in valid:
                label = f.name.replace("_", " ")
                raise ValueError(f"{label} must be one of {', '.join(valid)}, got {value!r}")
        check_ranges(self)  # each bad value names its option (--epochs must be >= 1, got 0)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")
        self.noise_config()  # validates bits, alpha, p
        method = self.training_method
        if self.qat and not method.qat:
            qat_names = ", ".join(n for n in list_methods() if get_method(n).qat)
            raise ValueError(f"--qat trains with a QAT method (--method {qat_names}), not the flat-training "
                             f"method {self.method!r}")
        if method.qat and not self.qat:
            raise ValueError(f"--method {self.method} is quantization-aware training: add --qat")
        if self.range_grad and not method.noise:
            raise ValueError(f"--range-grad shapes the quantization noise: --method {self.method} injects none")
        self.training_method.validate(self)

    @property
    def training_method(self) -> Method:
        """The registry entry of `method`."""
        return get_method(self.method)

    @property
    def bn_freeze(self) -> float:
        """qat_bn_freeze, resolved: BatchNorm on batch statistics until 0.8 of the run when weights or activations
        are at 2 bits (ResNet-20 W2A2: 56.9% against 26.3% frozen), frozen throughout above (W3A3: 80.4% frozen
        against 75.1%; W4A4 84.1% against 75.7%)."""
        if self.qat_bn_freeze is not None:
            return self.qat_bn_freeze
        w, a = self.noise_config().w_bits, self.noise_config().a_bits
        return 0.8 if min(w, a) <= 2 else 0.0

    def noise_config(self) -> NoiseConfig:
        """The noise injected while training (a method with `noise_fraction` perturbs a fraction p of it)."""
        return NoiseConfig(
            bits=self.bits,
            alpha=self.alpha,
            target=self.noise_target,
            keep_first_last_8bit=self.keep_first_last_8bit,
            p=self.noise_p if self.training_method.noise_fraction else 1.0,
            range_grad=self.range_grad,
        )

    def measure_noise_config(self) -> NoiseConfig:
        """The noise PTQ at the target bits would add (alpha 1, weights and activations): flatness is judged
        by it."""
        return NoiseConfig(bits=self.bits, alpha=1.0, target="both",
                           keep_first_last_8bit=self.keep_first_last_8bit)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a saved config, ignoring unknown keys; the old names of renamed fields are read too."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        for old, new in RENAMED_KEYS.items():
            if old in d and new not in values:
                values[new] = d[old]
        return cls(**values)
