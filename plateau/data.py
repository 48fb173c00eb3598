"""Image data: ImageFolder trees (`train/<class>/*`, `test/<class>/*`) or Plateau's generated `synthetic` set.

Images are decoded once into uint8 arrays (N, H, W, 3) and cached on disk, then batched as normalized float NCHW
tensors. Augmentation (random crop with padding, horizontal flip) works on the uint8 batch, before normalization.

    >>> train = load_split("../shared/data/cifar10", "train")
    >>> for x, y in batches(train, 128, mean, std, shuffle=True, augment=True): ...
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import PlateauError

__all__ = ["ImageSet", "load_split", "batches", "normalize", "dataset_stats", "SYNTHETIC", "cache_dir"]

SYNTHETIC = "synthetic"
_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.source)


def cache_dir() -> Path:
    d = Path(os.environ.get("PLATEAU_CACHE", Path.home() / ".cache" / "plateau"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- the generated data set ----------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = [
    "hstripes", "vstripes", "dstripes", "checker", "disc", "ring", "square", "frame", "cross", "triangle",
]


def _synthetic(split: str, n_per_class: int, size: int = 32) -> ImageSet:
    """Ten classes of coloured shapes and textures with random position, scale, colour and pixel noise.

    Deterministic per split; needs no download. Hard enough that a small CNN does not reach 100%.
    """
    rng = np.random.default_rng({"train": 1234, "test": 5678}[split])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for label, name in enumerate(SYNTHETIC_CLASSES):
        for _ in range(n_per_class):
            fg = rng.uniform(0, 1, 3).astype(np.float32)
            bg = rng.uniform(0, 1, 3).astype(np.float32)
            while np.abs(fg - bg).sum() < 0.6:
                bg = rng.uniform(0, 1, 3).astype(np.float32)
            cx, cy = rng.uniform(0.3, 0.7, 2) * size
            r = rng.uniform(0.18, 0.38) * size
            period = rng.uniform(4, 9)
            phase = rng.uniform(0, period)
            dx, dy = np.abs(xx - cx), np.abs(yy - cy)
            if name == "hstripes":
                m = ((yy + phase) % period) < period / 2
            elif name == "vstripes":
                m = ((xx + phase) % period) < period / 2
            elif name == "dstripes":
                m = ((xx + yy + phase) % period) < period / 2
            elif name == "checker":
                m = (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
            elif name == "disc":
                m = dx**2 + dy**2 < r**2
            elif name == "ring":
                d = np.sqrt(dx**2 + dy**2)
                m = (d < r) & (d > 0.6 * r)
            elif name == "square":
                m = (dx < r * 0.8) & (dy < r * 0.8)
            elif name == "frame":
                m = (dx < r * 0.8) & (dy < r * 0.8) & ~((dx < r * 0.45) & (dy < r * 0.45))
            elif name == "cross":
                m = ((dx < r * 0.25) & (dy < r)) | ((dy < r * 0.25) & (dx < r))
            else:  # triangle, apex up
                m = (yy - (cy - r) > 0) & (yy < cy + r) & (dx < (yy - (cy - r)) * 0.6)
            img = np.where(m[..., None], fg, bg)
            img = img + rng.normal(0, 0.12, img.shape).astype(np.float32)
            images.append(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
            labels.append(label)
    order = rng.permutation(len(labels))
    return ImageSet(np.stack(images)[order], np.asarray(labels, np.int64)[order], list(SYNTHETIC_CLASSES), SYNTHETIC)


# --- ImageFolder trees -----------------------------------------------------------------------------------------------
def _list_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise PlateauError(
            f"DATA {root.parent} is not an ImageFolder tree: {root} is missing (expected {root}/<class>/<image>)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise PlateauError(f"DATA {root.parent} is not an ImageFolder tree: no class folders in {root}")
    files = []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in _IMG_EXT:
                files.append((f, i))
    if not files:
        raise PlateauError(f"DATA {root.parent} is not an ImageFolder tree: no image files under {root}")
    return classes, files


def _decode(files: list[tuple[Path, int]], img_size: int | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from tqdm import tqdm

    images, labels = [], []
    for f, label in tqdm(files, desc=desc, unit="img", leave=False, mininterval=1.0):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if img_size is not None and im.size != (img_size, img_size):
                    im = im.resize((img_size, img_size), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
        except Exception as e:
            raise PlateauError(f"image {f} cannot be decoded ({type(e).__name__})") from None
        labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise PlateauError(f"images under {files[0][0].parent.parent} differ in size {sorted(shapes)[:3]}: "
                           "pass --img-size")
    return np.stack(images), np.asarray(labels, np.int64)


def load_split(data: str | Path, split: str, img_size: int | None = None) -> ImageSet:
    """Load `split` ('train' or 'test') of an ImageFolder tree, or of the generated set when data == 'synthetic'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if str(data) == SYNTHETIC:
        return _synthetic(split, 1000 if split == "train" else 200)
    root = Path(data)
    if not root.is_dir():
        raise PlateauError(f"DATA {root}: no such directory (give an ImageFolder tree or 'synthetic')")
    classes, files = _list_folder(root / split)
    # Cache key: the tree's identity (path, file count, newest mtime) and the decode size.
    stamp = max(os.stat(f).st_mtime_ns for f, _ in files[:: max(1, len(files) // 512)])
    key = hashlib.sha1(f"{root.resolve()}|{split}|{len(files)}|{stamp}|{img_size}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"imagefolder-{key}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return ImageSet(z["images"], z["labels"], classes, str(root))
    images, labels = _decode(files, img_size, f"decode {root.name}/{split}")
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cached)
    return ImageSet(images, labels, classes, str(root))


# --- batching ---------------------------------------------------------------------------------------------------------
def normalize(images: np.ndarray | torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] and normalized."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def dataset_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return [round(float(v), 4) for v in x.mean(0)], [round(float(v), 4) for v in x.std(0)]


def _augment(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ox = rng.integers(0, 2 * pad + 1, n)
    oy = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, oy[i] : oy[i] + h, ox[i] : ox[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def batches(
    data: ImageSet,
    batch_size: int,
    mean: list[float],
    std: list[float],
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches; with world_size > 1 each rank takes every world_size-th sample of the same order."""
    n = len(data) if limit is None else min(limit, len(data))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))[:n] if shuffle else np.arange(n)
    order = order[rank::world_size]
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        imgs = data.images[idx]
        if augment:
            imgs = _augment(imgs, rng)
        yield normalize(imgs, mean, std), torch.as_tensor(data.labels[idx])
