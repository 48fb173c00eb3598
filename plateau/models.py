"""The model registry: one `create_model(name)` for Plateau's own models and any timm model.

    >>> model = create_model("cifar_resnet20", checkpoint="resnet20-12fca82f.th")
    >>> list_models()[:3]
    ['cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44']

Every model carries `model.plateau_cfg` (input size, normalization), which checkpoints and manifests record.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PlateauError

__all__ = ["register_model", "create_model", "rebuild_model", "parse_model_kwargs", "list_models",
           "load_state_dict_file", "model_cfg", "read_torch_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: file a model constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_cfg(model: nn.Module) -> dict:
    cfg = getattr(model, "plateau_cfg", None)
    if cfg is None:
        cfg = {"input_size": [3, 32, 32], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return dict(cfg)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_model(name: str, num_classes: int, img_size: int | None, kw: dict) -> tuple[nn.Module, dict]:
    """A timm model and the keyword arguments that built it. An image size goes to models that take one; a
    transformer whose name has a patch size gets 4-pixel patches below 64 pixels (16 x 16 tokens at 64, 65 with
    the class token at 32), as CIFAR ViTs use. A model that takes neither is built without them."""
    import timm

    tries = []
    if img_size is not None:
        sized = {"img_size": img_size, **kw}
        if "patch" in name and "patch_size" not in kw:
            tries.append({**sized, "patch_size": 4 if img_size <= 64 else 16})
        tries.append(sized)
    tries.append(dict(kw))
    for i, args in enumerate(tries):
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **args), args
        except TypeError as e:  # a keyword this model does not take: try with fewer
            if i == len(tries) - 1 or "unexpected keyword" not in str(e):
                raise PlateauError(f"model {name!r} cannot be built with {args}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def create_model(
    name: str, num_classes: int = 10, checkpoint: str | Path | None = None, img_size: int | None = None, **kw
) -> nn.Module:
    """Build a registered model (or a timm model by name, with `kw` passed to timm) and optionally load a
    checkpoint into it. `model.plateau_cfg` records the input size, normalization and the keyword arguments that
    rebuild it (`create_model(name, **cfg["model_kwargs"])`).

    Unknown names raise PlateauError listing Plateau's models (timm names are accepted too).
    """
    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, **kw)
        if kw:
            model.plateau_cfg = {**model_cfg(model), "model_kwargs": dict(kw)}
    else:
        if name not in _timm_names():
            raise PlateauError(
                f"unknown model {name!r}: Plateau models are {', '.join(list_models())}; "
                "any timm model name is accepted too"
            )
        model, used = _timm_model(name, num_classes, img_size, kw)
        size = img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        model.plateau_cfg = {
            "input_size": [3, size, size],
            "mean": list(model.pretrained_cfg.get("mean", IMAGENET_MEAN)),
            "std": list(model.pretrained_cfg.get("std", IMAGENET_STD)),
            "model_kwargs": used,
        }
    model.plateau_name = name
    if checkpoint is not None:
        load_state_dict_file(model, checkpoint)
    return model


def parse_model_kwargs(text: str | None) -> dict:
    """'depth=6,global_pool=avg,class_token=false' -> {'depth': 6, 'global_pool': 'avg', 'class_token': False}:
    each value read as JSON where it parses (numbers, true/false, null, lists), else kept as text."""
    import json

    out: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise PlateauError(f"--model-kwargs: {item.strip()!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def rebuild_model(name: str, num_classes: int, plateau_cfg: dict | None) -> nn.Module:
    """The model a checkpoint, manifest or reference file describes: `create_model` with its recorded keyword
    arguments, carrying its recorded plateau_cfg."""
    kw = dict((plateau_cfg or {}).get("model_kwargs") or {})
    model = create_model(name, num_classes=num_classes, **kw)
    if plateau_cfg:
        model.plateau_cfg = dict(plateau_cfg)
    return model


def load_state_dict_file(model: nn.Module, path: str | Path) -> dict:
    """Load weights from a Plateau checkpoint, a bare state dict, or a {'state_dict': ...} file (DataParallel
    'module.' prefixes are stripped). Never unpickles arbitrary objects. Returns the file's other fields."""
    path = Path(path)
    blob = read_torch_file(path)
    if not isinstance(blob, dict):
        raise PlateauError(f"checkpoint {path}: expected a dict of tensors, got {type(blob).__name__}")
    state = blob.get("model", blob.get("state_dict", blob))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PlateauError(f"checkpoint {path}: no state dict of tensors found")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        v = state[bad]
        kind = "NaN" if torch.isnan(v).any() else "inf"
        raise PlateauError(f"checkpoint {path}: tensor {bad!r} holds {kind} values ({int((~torch.isfinite(v)).sum())} "
                           f"of {v.numel()}): the weights are broken (training diverged?); use an earlier checkpoint")
    own = model.state_dict()
    # BatchNorm's num_batches_tracked counter is absent from older checkpoints and never affects inference.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        name = getattr(model, "plateau_name", type(model).__name__)
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise PlateauError(f"checkpoint {path} does not fit model {name}: " + "; ".join(detail))
    model.load_state_dict(state, strict=False)
    return {k: v for k, v in blob.items() if k not in ("model", "state_dict")}


def read_torch_file(path: str | Path, what: str = "checkpoint", hint: str = "") -> object:
    """torch.load with weights_only=True (never unpickles arbitrary objects); a missing or unreadable file is a
    PlateauError naming it."""
    import pickle
    import warnings

    path = Path(path)
    if path.is_dir():
        raise PlateauError(f"{what} {path}: is a directory, not a {what} file")
    if not path.is_file():
        raise PlateauError(f"{what} {path}: no such file{hint}")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol chatter would precede the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a Python object: say which, never load it
        import re

        found = re.search(r"GLOBAL:? ?([\w.]+)", str(e), re.IGNORECASE)
        what_not = f": it holds {found.group(1)}, which Plateau never unpickles" if found else ""
        raise PlateauError(f"{what} {path}: cannot be read as a torch {what} (UnpicklingError){what_not}") from None
    except OSError as e:
        raise PlateauError(f"{what} {path}: cannot be read ({e.strerror})") from None
    except Exception as e:  # corrupt, truncated, or not a torch file
        raise PlateauError(f"{what} {path}: cannot be read as a torch {what} ({type(e).__name__})") from None


# --- Plateau's small default CNN --------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a = _conv_bn(ch, ch)
        self.b = _conv_bn(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(F.relu(self.a(x))) + x)


class SmallCNN(nn.Module):
    """A four-conv CNN with one residual block, for 32x32 inputs: the default model, trains in a minute on 2 cores."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn(3, w), nn.ReLU())
        self.down1 = nn.Sequential(_conv_bn(w, 2 * w, 2), nn.ReLU())
        self.res = _Residual(2 * w)
        self.down2 = nn.Sequential(_conv_bn(2 * w, 4 * w, 2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down2(self.res(self.down1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    m = SmallCNN(num_classes, width)
    m.plateau_cfg = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return m


# --- CIFAR ResNets (He et al. 2016), key-compatible with the public pretrained checkpoints ----------------------------
class _ShortcutA(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad channels, no parameters."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != planes:
            self.shortcut = _ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        layers = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, planes, stride if i == 0 else 1))
                cin = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


def _cifar_resnet(depth: int, num_classes: int) -> nn.Module:
    m = CifarResNet(depth, num_classes)
    m.plateau_cfg = {"input_size": [3, 32, 32], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return m


@register_model
def cifar_resnet20(num_classes: int = 10) -> nn.Module:
    return _cifar_resnet(20, num_classes)


@register_model
def cifar_resnet32(num_classes: int = 10) -> nn.Module:
    return _cifar_resnet(32, num_classes)


@register_model
def cifar_resnet44(num_classes: int = 10) -> nn.Module:
    return _cifar_resnet(44, num_classes)


@register_model
def cifar_resnet56(num_classes: int = 10) -> nn.Module:
    return _cifar_resnet(56, num_classes)
