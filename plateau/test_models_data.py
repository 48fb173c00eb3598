"""The model registry and data loading."""

from pathlib import Path

import numpy as np
import pytest
import torch

from plateau.data import SYNTHETIC, batches, load_split
from plateau.errors import PlateauError
from plateau.models import create_model, list_models, load_state_dict_file

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs(name):
    m = create_model(name).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, *m.plateau_cfg["input_size"])).shape == (2, 10)


def test_unknown_model_names_the_choices():
    with pytest.raises(PlateauError, match="unknown model 'nope'.*cifar_resnet20"):
        create_model("nope")


def test_timm_model_by_name():
    m = create_model("resnet18", num_classes=10, img_size=32)
    assert m.plateau_cfg["input_size"] == [3, 32, 32]


def test_checkpoint_that_does_not_fit(tmp_path):
    torch.save({"state_dict": create_model("cifar_resnet20").state_dict()}, tmp_path / "r20.pt")
    with pytest.raises(PlateauError, match="does not fit model cifar_resnet32"):
        create_model("cifar_resnet32", checkpoint=tmp_path / "r20.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PlateauError, match="cannot be read"):
        load_state_dict_file(create_model("small_cnn"), tmp_path / "bad.pt")


@pytest.mark.skipif(not (SHARED / "models/cifar-resnet").is_dir(), reason="../shared/models is not present")
@pytest.mark.parametrize("depth,file", [(20, "resnet20-12fca82f.th"), (56, "resnet56-4bfd9763.th")])
def test_pretrained_cifar_resnets_load_as_they_are(depth, file):
    m = create_model(f"cifar_resnet{depth}", checkpoint=SHARED / "models/cifar-resnet" / file)
    assert sum(p.numel() for p in m.parameters()) > 0.25e6


def test_synthetic_is_deterministic_and_balanced():
    a, b = load_split(SYNTHETIC, "test"), load_split(SYNTHETIC, "test")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (2000, 32, 32, 3) and np.bincount(a.labels).tolist() == [200] * 10


def test_imagefolder_reads_a_tree_and_rejects_others(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("PLATEAU_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            d = tmp_path / "tree" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(d / f"{i}.png")
    s = load_split(tmp_path / "tree", "train")
    assert s.images.shape == (6, 8, 8, 3) and s.classes == ["cat", "dog"]
    assert load_split(tmp_path / "tree", "train").images.shape == (6, 8, 8, 3)  # from the cache
    (tmp_path / "flat").mkdir()
    with pytest.raises(PlateauError, match="not an ImageFolder tree"):
        load_split(tmp_path / "flat", "train")
    with pytest.raises(PlateauError, match="no such directory"):
        load_split(tmp_path / "missing", "train")


def test_batches_normalize_and_augment():
    s = load_split(SYNTHETIC, "test")
    x, y = next(batches(s, 16, [0.5] * 3, [0.25] * 3, shuffle=True, augment=True))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert abs(float(x.mean())) < 1.5


def test_progress_bar_is_off_without_a_terminal_and_passes_items_through(capsys):
    """Every per-image loop's bar: the items pass unchanged, and with stderr not a terminal (a log, a pipe, this
    test's capture) nothing is drawn, so an error line is the only thing a script's stderr holds."""
    from plateau.data import progress

    with progress(total=3, desc="decode") as bar:
        for _ in range(3):
            bar.update(1)
    assert list(progress(iterable=iter([1, 2, 3]), desc="eval")) == [1, 2, 3]
    assert bar.disable and capsys.readouterr().err == ""
