"""Image data: ImageFolder trees (`train/<class>/*`, `test/<class>/*`) or Plateau's generated `synthetic` set.

Images are decoded once into uint8 arrays (N, H, W, 3) and cached on disk, then batched as normalized float NCHW
tensors. Augmentation (random crop with padding, horizontal flip) works on the uint8 batch, before normalization.

    >>> train = load_split("../shared/data/cifar10", "train")
    >>> for x, y in batches(train, 128, mean, std, shuffle=True, augment=True): ...
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import PlateauError

__all__ = ["ImageSet", "load_split", "load_splits", "check_classes", "batches", "normalize", "dataset_stats",
           "SYNTHETIC", "cache_dir", "check_image_size"]

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


def _usable_cache_dir() -> Path | None:
    """The decoded-data cache folder, or None (with a note) when it cannot be made: data then decodes every
    time, which is slow but right."""
    try:
        return cache_dir()
    except OSError as e:
        where = os.environ.get("PLATEAU_CACHE", "~/.cache/plateau")
        print(f"plateau: note: data cache {where} unusable ({e.strerror}); decoding without a cache", flush=True)
        return None


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


def progress(total: int | None = None, desc: str = "", unit: str = "img", iterable=None):
    """The progress bar of every per-image loop: transient, and off when stderr is no terminal (a log, a pipe),
    where it would be noise before any error line (tqdm's disable=None)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, mininterval=1.0, disable=None)


def _decode(files: list[tuple[Path, int]], img_size: int | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for f, label in progress(desc=desc, iterable=files):
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
        return _synthetic(split, 1000 if split == "train" else 200, img_size or 32)
    root = Path(data)
    if root.exists() and not root.is_dir():
        raise PlateauError(f"DATA {root}: is a file; give an ImageFolder tree (train/<class>/*, test/<class>/*) "
                           "or 'synthetic'")
    if not root.is_dir():
        raise PlateauError(f"DATA {root}: no such directory (give an ImageFolder tree or 'synthetic')")
    classes, files = _list_folder(root / split)
    # Cache key: the tree's identity (path, file count, newest mtime) and the decode size.
    stamp = max(os.stat(f).st_mtime_ns for f, _ in files[:: max(1, len(files) // 512)])
    key = hashlib.sha1(f"{root.resolve()}|{split}|{len(files)}|{stamp}|{img_size}".encode()).hexdigest()[:16]
    folder = _usable_cache_dir()
    cached = folder / f"imagefolder-{key}.npz" if folder is not None else None
    if cached is not None and cached.exists():
        hit = _read_cache(cached, len(files), len(classes), img_size)
        if hit is not None:
            return ImageSet(hit[0], hit[1], classes, str(root))
    images, labels = _decode(files, img_size, f"decode {root.name}/{split}")
    if cached is not None:
        _write_cache(cached, images, labels)
    return ImageSet(images, labels, classes, str(root))


def _read_cache(path: Path, n: int, n_classes: int, img_size: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A cache entry's (images, labels) if it is whole and fits the tree (n images, labels < n_classes); else
    None, after removing it so it is rebuilt: a truncated or foreign file must not be trusted."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
        ok = (images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == n and images.shape[3] == 3
              and labels.shape == (n,) and labels.dtype.kind in "iu" and n > 0
              and int(labels.min()) >= 0 and int(labels.max()) < n_classes
              and (img_size is None or images.shape[1:3] == (img_size, img_size)))
    except Exception as e:  # zip, npy and key errors alike: the entry is unusable, whatever broke it
        ok, why = False, type(e).__name__
    else:
        why = "it does not match the image tree"
    if ok:
        return images, labels
    print(f"plateau: note: rebuilding the data cache entry {path} ({why})", flush=True)
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a cache entry through a temporary name (a kill leaves no half-written entry under the real one);
    a cache that cannot be written is skipped, with a note."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError as e:
        print(f"plateau: note: cannot write the data cache entry {path} ({e.strerror}); continuing without it",
              flush=True)
        with contextlib.suppress(OSError):
            tmp.unlink()
    for stale in path.parent.glob("imagefolder-*.tmp*.npz"):  # temporaries of killed writers
        pid = stale.suffixes[-2].removeprefix(".tmp") if len(stale.suffixes) >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                stale.unlink()


def check_classes(data: ImageSet, classes: list[str] | None, num_classes: int | None, source: str,
                  data_name: str | None = None) -> None:
    """Refuse a model (checkpoint, export) whose classes are not the data's: a different count, or different
    names where the model records them. Scoring a model with another data set's labels is nonsense, not a
    low accuracy."""
    name = data_name or data.source
    have = list(data.classes)
    if num_classes is not None and num_classes != len(have):
        raise PlateauError(f"{source} has {num_classes} classes but DATA {name} has {len(have)} "
                           f"({_names(have)}): use the data the model was trained on")
    if classes is not None and list(classes) != have:
        diff = next((i for i, (a, b) in enumerate(zip(classes, have, strict=False)) if a != b),
                    min(len(classes), len(have)))
        got = classes[diff] if diff < len(classes) else "(none)"
        want = have[diff] if diff < len(have) else "(none)"
        raise PlateauError(f"{source} was trained on other classes than DATA {name}: class {diff} is {got!r} "
                           f"there and {want!r} here ({_names(classes)} vs {_names(have)})")


def _names(classes: list[str], k: int = 4) -> str:
    return ", ".join(classes[:k]) + (f", ... ({len(classes)} in all)" if len(classes) > k else "")


def load_splits(data: str | Path, img_size: int | None = None) -> tuple[ImageSet, ImageSet]:
    """The train and test splits, checked to be one classification task: the same class names in the same
    order (else every label would mean another class), and at least two classes."""
    if str(data) != SYNTHETIC and Path(data).is_dir():  # the class folders first: refused before any decoding
        _check_split_classes(data, _list_folder(Path(data) / "train")[0], _list_folder(Path(data) / "test")[0])
    train, test = load_split(data, "train", img_size), load_split(data, "test", img_size)
    _check_split_classes(data, train.classes, test.classes)
    return train, test


def check_image_size(images: ImageSet, input_size: list[int], model: str) -> None:
    """One line when the data's images are not the size the model takes (a ViT's patch grid and position table
    are built for one size)."""
    h, w = images.images.shape[1:3]
    mh, mw = input_size[-2:]
    if (h, w) != (mh, mw):
        raise PlateauError(f"DATA {images.source}: the images are {h}x{w} but {model} takes {mh}x{mw}: pass "
                           f"--img-size {h} to build the model for the data, or --img-size {mh} to resize the images")


def _check_split_classes(data: str | Path, train: list[str], test: list[str]) -> None:
    if len(train) < 2:
        raise PlateauError(f"DATA {data} has one class ({train[0]!r}): a classifier needs at least two")
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        detail = "; ".join(x for x in (
            f"only in train/: {_names(only_train)}" if only_train else "",
            f"only in test/: {_names(only_test)}" if only_test else "") if x) or "same names, other order"
        raise PlateauError(f"DATA {data}: the test split's classes differ from the train split's ({detail}); "
                           "each split needs the same class folders")


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
