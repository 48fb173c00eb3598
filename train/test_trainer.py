"""The loop: outputs, every method, exact resume after a kill, NaN handling, bad input, fine-tuning, DDP."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from plateau.data import ImageSet
from plateau.errors import PlateauError
from plateau.train import TrainConfig, add_arguments, get_method, list_methods, main, train

torch.set_num_threads(1)
SHARED = Path("/work/shared")
R20 = SHARED / "models/cifar-resnet/resnet20-12fca82f.th"


class Tiny(nn.Module):
    """Two convs and a linear: enough for BN, Conv and Linear layers, fast on one core."""

    def __init__(self, fail_after: int | None = None, nan_after: int | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)
        self.plateau_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}
        self.plateau_name = "tiny"
        self.calls, self.fail_after, self.nan_after = 0, fail_after, nan_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise KeyboardInterrupt("simulated kill")
        out = self.fc(torch.flatten(self.pool(self.features(x)), 1))
        if self.nan_after is not None and self.calls > self.nan_after:
            out = out * float("nan")
        return out


def _images(n: int, seed: int) -> ImageSet:
    """Four classes told apart by the mean colour: learnable in a couple of epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[labels]
    imgs = base[:, None, None, :] + rng.normal(0, 40, (n, 16, 16, 3))
    pixels = np.clip(imgs, 0, 255).astype(np.uint8)
    return ImageSet(pixels, labels.astype(np.int64), ["r", "g", "b", "y"], "test")


TRAIN, TEST = _images(192, 0), _images(64, 1)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, lr=0.05, bits="W4A4", method="gaussian", flatness="off",
                progress=False, flatness_images=64, trace_samples=2, eig_iters=3, mc_samples=2,
                calib_images=64)
    return TrainConfig(**{**base, **kw})


def test_outputs_and_checkpoint_contract(tmp_path):
    torch.manual_seed(0)
    report = train(Tiny(), _cfg(flatness="epoch"), tmp_path, TRAIN, TEST)
    out = tmp_path / "train"
    for name in ("checkpoint-epoch001.pt", "checkpoint-epoch002.pt", "last.pt", "metrics.jsonl",
                 "report.json", "report.md", "manifest.json"):
        assert (out / name).is_file(), name
    ck = torch.load(out / "last.pt", weights_only=True)  # only plain types: safe to load
    for key in ("model", "model_name", "num_classes", "plateau_cfg", "classes", "config", "optimizer",
                "scheduler", "rng", "noise", "epoch"):
        assert key in ck, key
    assert ck["epoch"] == 2 and ck["model_name"] == "tiny" and ck["classes"] == ["r", "g", "b", "y"]
    assert set(ck["noise"]["act_ranges"]) == {"features.0", "features.3", "fc"}
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("flatness" in r for r in lines)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "plateau.train" and m["outputs"]["checkpoint"] == "last.pt"
    f = report["flatness_final"]
    assert f["hessian_trace"] > 0 and np.isfinite(f["top_eigenvalue"])
    assert report["flatness_initial"] is not None  # epoch 0, before training
    gap = report["quant_gap"]
    assert gap["bits"] == "W4A4"
    assert not gap["skipped"] and 0 <= gap["ptq_top1"] <= 100, gap  # the core's PTQ takes the small CNN
    assert report["fp_top1"] > 60  # learnable toy data


@pytest.mark.parametrize("method", [m for m in list_methods() if not get_method(m).qat])  # QAT: test_qat.py
def test_every_method_trains(tmp_path, method):
    torch.manual_seed(0)
    r = train(Tiny(), _cfg(method=method, epochs=1), tmp_path, TRAIN, TEST)
    assert np.isfinite(r["final"]["train_loss"])


@pytest.mark.parametrize("method", ["gaussian", "ramp", "sam-gaussian"])
def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path, method):
    cfg = _cfg(method=method, epochs=3)
    torch.manual_seed(0)
    ref = Tiny()
    train(ref, cfg, tmp_path / "a", TRAIN, TEST)

    steps = 6  # 192 images / batch 32
    passes = 2 if method.startswith("sam") else 1
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of epoch 3
        train(Tiny(fail_after=(2 * steps + 3) * passes), cfg, tmp_path / "b", TRAIN, TEST)
    assert torch.load(tmp_path / "b/train/last.pt", weights_only=True)["epoch"] == 2

    torch.manual_seed(123)  # a new process: different init, overwritten by the checkpoint
    resumed = Tiny()
    rep = train(resumed, _cfg(method=method, epochs=3, resume=True), tmp_path / "b", TRAIN, TEST)
    assert rep["epochs_run"] == 3
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    lines = (tmp_path / "b/train/metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]


def test_kd_distils_from_the_starting_model_and_resumes_with_it(tmp_path):
    """--kd on a flat method: the teacher is the model as training started, frozen, kept in the checkpoint, so a
    resumed run (its model built afresh) distils from the same teacher and ends on the same weights."""
    cfg = _cfg(method="alternate", kd=2.0, epochs=3)
    torch.manual_seed(0)
    ref = Tiny()
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    train(ref, cfg, tmp_path / "a", TRAIN, TEST)
    teacher = torch.load(tmp_path / "a/train/last.pt", weights_only=True)["teacher"]
    assert all(torch.equal(teacher[k], start[k]) for k in start), "the teacher moved"

    torch.manual_seed(0)
    plain = Tiny()
    train(plain, _cfg(method="alternate", epochs=3), tmp_path / "p", TRAIN, TEST)
    assert any(not torch.equal(ref.state_dict()[k], plain.state_dict()[k]) for k in start), "kd changed nothing"

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of epoch 3
        train(Tiny(fail_after=2 * 6 + 3), cfg, tmp_path / "b", TRAIN, TEST)
    torch.manual_seed(123)  # a different model: its copy would be the wrong teacher
    resumed = Tiny()
    train(resumed, _cfg(method="alternate", kd=2.0, epochs=3, resume=True), tmp_path / "b", TRAIN, TEST)
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_kd_refusals(tmp_path):
    with pytest.raises(ValueError, match="--kd is not supported with --method sam"):
        TrainConfig(method="sam-gaussian", kd=1.0)
    with pytest.raises(PlateauError, match="--kd distils from the model training starts from: pass --checkpoint"):
        main(_args(tmp_path, "--kd", "1", "--train-limit", "64"))
    with pytest.raises(PlateauError, match="pass --checkpoint"):  # --resume with nothing to resume: a fresh start
        main(_args(tmp_path, "--kd", "1", "--resume", "--train-limit", "64"))
    assert not (tmp_path / "train").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(PlateauError, match=r"NaN.*epoch 2.*last good checkpoint"):
        train(Tiny(nan_after=8), _cfg(epochs=3), tmp_path, TRAIN, TEST)
    ck = torch.load(tmp_path / "train/last.pt", weights_only=True)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "train/checkpoint-epoch002.pt").exists()


def test_nan_in_first_epoch_says_no_checkpoint(tmp_path):
    with pytest.raises(PlateauError, match="no checkpoint was written"):
        train(Tiny(nan_after=0), _cfg(epochs=1), tmp_path, TRAIN, TEST)


def _args(tmp_path, *argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--run", str(tmp_path), "--no-progress", "--flatness", "off", "--threads", "1",
                         *argv])


def test_unknown_model_name(tmp_path):
    with pytest.raises(PlateauError, match="unknown model 'no_such_net'"):
        main(_args(tmp_path, "--model", "no_such_net", "--train-limit", "64"))


def test_checkpoint_that_does_not_fit(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(PlateauError, match="does not fit model small_cnn"):
        main(_args(tmp_path, "--checkpoint", str(bad), "--train-limit", "64"))


def test_bad_options():
    with pytest.raises(ValueError, match="method must be one of none, gaussian"):
        TrainConfig(method="dropout")
    with pytest.raises(ValueError, match="W<bits>A<bits>"):
        TrainConfig(bits="int4")


def test_resume_refuses_other_model(tmp_path):
    train(Tiny(), _cfg(epochs=1), tmp_path, TRAIN, TEST)
    other = Tiny()
    other.plateau_name = "other"
    with pytest.raises(PlateauError, match="holds model 'tiny'"):
        train(other, _cfg(epochs=2, resume=True), tmp_path, TRAIN, TEST)


@pytest.mark.skipif(not R20.is_file(), reason=f"pretrained checkpoint {R20} not present")
def test_finetune_from_pretrained_cifar_resnet20(tmp_path):
    from plateau.models import create_model

    ref = torch.load(R20, map_location="cpu", weights_only=True)["state_dict"]["module.conv1.weight"]
    assert torch.equal(create_model("cifar_resnet20", checkpoint=R20).conv1.weight.detach(), ref)
    report = main(_args(tmp_path, "--model", "cifar_resnet20", "--checkpoint", str(R20), "--epochs", "1",
                        "--train-limit", "128", "--eval-limit", "128", "--calib-images", "64",
                        "--lr", "1e-4"))
    assert report["model_name"] == "cifar_resnet20" and report["config"]["lr"] == 1e-4
    m = json.loads((tmp_path / "train/manifest.json").read_text())
    assert m["inputs"]["checkpoint_sha256"]


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "plateau.train", "--", "--run", str(tmp_path), "--epochs", "2", "--train-limit", "512",
           "--eval-limit", "256", "--flatness", "end", "--flatness-images", "64", "--threads", "1",
           "--no-progress", "--noise", "sam-gaussian", "--bits", "W4A8", "--calib-images", "64"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "train/report.json").read_text())
    assert report["world_size"] == 2 and report["epochs_run"] == 2
    assert report["flatness_final"]["hessian_trace"] > 0
    ck = torch.load(tmp_path / "train/last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ck["model"])  # saved unwrapped, loadable by export


@pytest.mark.slow
def test_range_grad_is_refused_under_torchrun(tmp_path):
    """Its weight-step gradient is formed after DDP's all-reduce, from one rank's draw: refused, not run wrong."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "plateau.train", "--", "--run", str(tmp_path), "--epochs", "1", "--train-limit", "64",
           "--threads", "1", "--no-progress", "--range-grad", "--flatness", "off", "--overwrite"]
    (tmp_path / "train").mkdir()
    (tmp_path / "train/last.pt").write_bytes(b"an earlier run")  # --overwrite must not clear it first
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--range-grad runs in one process" in res.stderr + res.stdout
    assert (tmp_path / "train/last.pt").read_bytes() == b"an earlier run"


def test_bad_option_value_is_plateau_error(tmp_path):
    with pytest.raises(PlateauError, match="bad BITS 'W4'"):
        main(_args(tmp_path, "--bits", "W4"))


def test_bn_recalibration_uses_clean_forwards():
    """After noisy training, BN statistics are re-estimated without noise: equal to the clean batch
    statistics, whatever the noise, and the injector is left as it was."""
    from plateau.train import recalibrate_bn
    from plateau.train.noise import NoiseConfig, NoiseInjector

    torch.manual_seed(0)
    model = Tiny()
    inj = NoiseInjector(model, NoiseConfig(bits="W2A2", alpha=50.0), torch.Generator().manual_seed(0))
    x = torch.randn(32, 3, 16, 16)
    model.train()
    model(x)  # a noisy forward: activation ranges observed, noise on
    ranges = {k: v.clone() for k, v in inj.act_ranges.items()}
    assert recalibrate_bn(model, inj, [(x, None)]) == 32
    bn = model.features[1]
    assert inj.enabled and inj.observe and bn.momentum == 0.1 and model.training
    assert all(torch.equal(ranges[k], inj.act_ranges[k]) for k in ranges)
    with torch.no_grad():
        h = model.features[0].eval()(x)  # eval mode: the injector's hooks stay out
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "mobilenetv2_100",
                                  "resnet18"])
def test_timm_models_train_with_noise(tmp_path, name):
    """timm models by name at 32x32 (ViT / DeiT with patch size 4): a noisy training epoch runs, the noise
    reaches their Conv/Linear layers, and the checkpoint reloads."""
    from plateau.models import create_model
    from plateau.train.noise import quant_layers

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 32)
    imgs = np.clip(rng.normal(128, 50, (32, 32, 32, 3)), 0, 255).astype(np.uint8)
    data = ImageSet(imgs, labels.astype(np.int64), ["a", "b", "c", "d"], "train")
    model = create_model(name, num_classes=4, img_size=32)
    assert model.plateau_cfg["input_size"] == [3, 32, 32] and len(quant_layers(model)) >= 2
    cfg = _cfg(epochs=1, batch_size=16, lr=0.01, quant_gap=False, bn_recalibrate=32)
    rep = train(model, cfg, tmp_path, data, data)
    assert np.isfinite(rep["final"]["train_loss"])
    blob = torch.load(tmp_path / "train" / "last.pt", weights_only=True)
    create_model(name, num_classes=4, img_size=32).load_state_dict(blob["model"])


def test_probability_bits_reach_the_attention_noise(tmp_path, monkeypatch):
    """TrainConfig.probability_bits (--probability-bits) is the width the trainer gives the probabilities' noise."""
    from plateau.models import create_model
    from plateau.train import trainer

    seen = []
    real = trainer.attention_noise_graph
    monkeypatch.setattr(trainer, "attention_noise_graph", lambda m, inj, bits: seen.append(bits) or real(m, inj, bits))
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 255, (16, 16, 16, 3), dtype=np.uint8), rng.integers(0, 2, 16).astype(np.int64),
                    ["a", "b"], "train")
    model = create_model("vit_tiny_patch16_224", num_classes=2, img_size=16, depth=1, embed_dim=32, num_heads=2,
                         mlp_ratio=2.0)
    rep = train(model, _cfg(epochs=1, batch_size=8, bits="W4A3", probability_bits=3, quant_gap=False,
                            bn_recalibrate=0), tmp_path, data, data)
    assert seen == [3] and np.isfinite(rep["final"]["train_loss"])


def test_resume_from_checkpoint_with_old_config_keys(tmp_path):
    """Checkpoints written before the renames (config keys `noise`, `first_last_8bit`) resume exactly."""
    cfg = _cfg(method="ramp", keep_first_last_8bit=True)
    torch.manual_seed(0)
    ref = Tiny()
    train(ref, cfg, tmp_path / "a", TRAIN, TEST)
    torch.manual_seed(0)
    train(Tiny(), cfg, tmp_path / "b", TRAIN, TEST)
    out = tmp_path / "b/train"
    blob = torch.load(out / "checkpoint-epoch001.pt", weights_only=True)
    c = blob["config"]
    c["noise"], c["first_last_8bit"] = c.pop("method"), c.pop("keep_first_last_8bit")
    torch.save(blob, out / "last.pt")  # as if killed after epoch 1 by the old code
    (out / "checkpoint-epoch002.pt").unlink()
    resumed = Tiny()
    rep = train(resumed, _cfg(resume=True), tmp_path / "b", TRAIN, TEST)
    assert rep["config"]["method"] == "ramp" and rep["config"]["keep_first_last_8bit"] is True
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
