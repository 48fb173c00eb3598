"""Quantization-aware training: the training forward is the reference's fake-quant, every registered objective
trains, the learned model exports as it is (onnxruntime and the compiled library equal to the reference that QAT
trained), a killed run resumes to the same weights, and wrong combinations are refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from plateau.models import create_model
from plateau.train.config import TrainConfig
from plateau.train.methods import get_method, list_methods
from plateau.train.optim import make_optimizer
from plateau.train.perturb import StepContext
from plateau.train.qat import QATNet, build_qat, qat_quant_config
from plateau.train.qat_objectives import intervention_mix, kd_loss, mec_loss, second_view

QAT_METHODS = [m for m in list_methods() if get_method(m).qat]


def _net(bits: str = "W4A4", seed: int = 0, model: str = "small_cnn"):
    torch.manual_seed(seed)
    m = create_model(model, num_classes=10).eval()
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    return build_qat(m, calib, qat_quant_config(bits, keep_first_last_8bit=False))


def test_qat_methods_registered():
    assert set(QAT_METHODS) == {"lsq", "fpq", "cr", "mec", "ti"}


def test_eval_forward_is_the_exported_reference():
    """The training forward in eval mode computes what the exported reference simulates, and the reference's
    integer forward (what devices are held to) agrees with it within a step."""
    net = _net("W4A4")
    with torch.no_grad():  # move the weights and scales off their calibrated values first
        for p in net.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p)).abs_() if p.ndim == 0 else p.mul_(1 + 0.05 * torch.randn_like(p))
    net.after_step()
    net.eval()
    x = torch.randn(32, 3, 32, 32)
    ref = net.to_reference()
    with torch.no_grad():
        got = net(x)
    assert torch.equal(got, ref.simulate(x))
    steps = ((ref(x) - got).abs() / ref.output_step).round()
    assert steps.max() <= 1 and (steps == 0).float().mean() > 0.99


def test_batchnorm_on_batch_statistics_then_folded():
    """Convs with a BatchNorm train their raw weight, gamma and beta on batch statistics (the running ones
    updated) until frozen; in eval mode and in the exported reference the folded form at the running statistics."""
    torch.manual_seed(0)
    m = create_model("small_cnn", num_classes=10).eval()
    net = build_qat(m, [torch.randn(16, 3, 32, 32)], qat_quant_config("W3A3", False), bn_batch_statistics=True)
    assert net.bn_eps and not net.bn_frozen
    k = next(iter(net.bn_eps))
    mean0 = getattr(net, f"bn_mean_{k}").clone()
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert net.bn_g[k].grad is not None and net.w[k].grad is not None
    opt.step()
    assert not torch.equal(getattr(net, f"bn_mean_{k}"), mean0)
    net.eval()
    ref = net.to_reference()
    with torch.no_grad():
        assert torch.equal(net(x), ref.simulate(x))
    state = net.state_dict()
    again = QATNet.from_state(m, net.qcfg, state, bn_batch_statistics=True).eval()
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


@pytest.mark.parametrize("method", QAT_METHODS)
def test_every_objective_trains(method):
    """A few steps of each objective on one batch lower its loss and move weights and scales."""
    net = _net("W4A4").train()
    cfg = TrainConfig(qat=True, method=method, bits="W4A4", lr=0.05, kd=0.5, intervention=0.5)
    opt = make_optimizer(net, cfg)
    ctx = StepContext(net=net, model=net, injector=None, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                      cfg=cfg, step=0, total_steps=20)
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    losses = []
    for k in range(20):
        ctx.step = k
        loss, out = cfg.training_method.step(ctx, x, y)
        opt.step()
        net.after_step()
        losses.append(float(loss))
        assert torch.isfinite(loss) and out.shape == (32, 10)
    assert losses[-1] < losses[0]
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("sa."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("sw."))


def test_objectives():
    z = torch.randn(64, 16)
    assert float(kd_loss(z, z)) == pytest.approx(0.0, abs=1e-6)
    # MEC rewards a student whose features code the teacher's: aligned beats unrelated
    assert float(mec_loss(z, z)) < float(mec_loss(torch.randn(64, 16), z))
    assert intervention_mix(0, 100, 0.5) == 1.0 and intervention_mix(25, 100, 0.5) == 0.5
    assert intervention_mix(50, 100, 0.5) == 0.0 and intervention_mix(99, 100, 0.0) == 0.0
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    v = second_view(x, pad=2)
    assert v.shape == x.shape and not torch.equal(v, x)


def test_teacher_intervention_replaces_block_outputs():
    net = _net("W2A2").eval()
    x = torch.randn(8, 3, 32, 32)
    t_out, t_taps = net.teacher(x)
    with torch.no_grad():
        full = net(x, replace=t_taps, mix=1.0)
        none = net(x, replace=t_taps, mix=0.0)
    assert torch.equal(none, net(x))
    # fully intervened, only the layers after the last block output are quantized: closer to the teacher
    assert (full - t_out).abs().mean() < (none - t_out).abs().mean()


def _plateau(cwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plateau", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


QUICK = ["--data", "synthetic", "--train-limit", "256", "--batch-size", "64", "--eval-limit", "128",
         "--no-progress"]


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat")
    p = _plateau(d, "train", "--run", "fp", "--epochs", "1", "--flatness", "off", "--no-quant-gap", *QUICK)
    assert p.returncode == 0, p.stderr[-2000:]
    return d


def test_qat_run_exports_its_learned_scales(fp_run):
    d = fp_run
    p = _plateau(d, "train", "--run", "q", "--qat", "--bits", "W4A4", "--checkpoint", "fp/train/last.pt",
                 "--epochs", "2", "--kd", "1", *QUICK)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((d / "q/train/report.json").read_text())
    gap = rep["quant_gap"]
    assert gap["qat"] and rep["config"]["method"] == "lsq" and "reference_top1" in gap
    blob = torch.load(d / "q/train/last.pt", weights_only=True)
    p = _plateau(d, "export", "--run", "q", "--eval-limit", "128")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no calibration" in p.stdout
    ex = json.loads((d / "q/export/report.json").read_text())
    assert ex["quantization_aware_training"] and ex["bits"] == "W4A4"
    assert ex["onnxruntime_vs_reference"]["bit_exact"] == 1.0
    # the same reference on the same 128 test images (export reports fractions, train percent)
    assert 100 * ex["top1"]["reference"] == pytest.approx(gap["reference_top1"])
    # the learned activation scales are in the reference as trained, bit for bit
    from plateau.export.reference_file import load_reference

    ref = load_reference(d / "q/export/reference.pt")
    learned = {k[3:]: float(v) for k, v in blob["model"].items() if k.startswith("sa.")}
    assert learned and all(ref.acts[k].scale == s for k, s in learned.items())


@pytest.mark.slow
def test_qat_compiled_library_equals_the_trained_reference(fp_run):
    d = fp_run
    p = _plateau(d, "train", "--run", "c", "--qat", "--bits", "W4A8", "--checkpoint", "fp/train/last.pt",
                 "--epochs", "1", "--method", "ti", *QUICK)
    assert p.returncode == 0, p.stderr[-2000:]
    for argv in (["export", "--run", "c", "--eval-limit", "128"], ["compile", "--run", "c"],
                 ["validate", "--run", "c", "--limit", "128"]):
        p = _plateau(d, *argv)
        assert p.returncode == 0, (argv, p.stderr[-2000:])
    val = json.loads((d / "c/validate/host/report.json").read_text())
    assert val["device_vs_reference"]["bit_exact"] == 1.0


def test_qat_resume_continues_exactly(fp_run):
    d = fp_run
    # W2A2: BatchNorm on batch statistics (running statistics in the state) until 0.8 of the run, then folded
    common = ["--qat", "--bits", "W2A2", "--checkpoint", "fp/train/last.pt", "--method", "fpq", *QUICK]
    p = _plateau(d, "train", "--run", "whole", "--epochs", "2", *common)
    assert p.returncode == 0, p.stderr[-2000:]
    # killed (SIGKILL) right after the first epoch's checkpoint, then resumed
    env = {**os.environ, "PLATEAU_PAUSE_AFTER": "last.pt"}
    proc = subprocess.Popen([sys.executable, "-m", "plateau", "train", "--run", "cut", "--epochs", "2", *common],
                            cwd=d, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "paused after" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert torch.load(d / "cut/train/last.pt", weights_only=True)["epoch"] == 1
    p = _plateau(d, "train", "--run", "cut", "--epochs", "2", "--resume", *common)
    assert p.returncode == 0, p.stderr[-2000:]
    a = torch.load(d / "whole/train/last.pt", weights_only=True)["model"]
    b = torch.load(d / "cut/train/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, words", [
    (["train", "--run", "e1", "--qat", "--bits", "W1A8", "--checkpoint", "fp/train/last.pt"], ["W1A8"]),
    (["train", "--run", "e2", "--qat", "--bits", "W9A8", "--checkpoint", "fp/train/last.pt"], ["W9A8"]),
    (["train", "--run", "e3", "--qat", "--bits", "W4A4"], ["--checkpoint"]),
    (["train", "--run", "e4", "--qat", "--method", "gaussian", "--checkpoint", "fp/train/last.pt"],
     ["--qat", "gaussian"]),
    (["train", "--run", "e5", "--method", "lsq", "--checkpoint", "fp/train/last.pt"], ["--qat"]),
    (["export", "--run", "fp", "--qat"], ["not a QAT checkpoint"]),
])
def test_bad_qat_input(fp_run, argv, words):
    p = _plateau(fp_run, *argv, *QUICK[:2])
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert all(w in p.stderr for w in words), p.stderr


def test_qat_checkpoint_misused(fp_run):
    d = fp_run
    p = _plateau(d, "train", "--run", "m", "--qat", "--bits", "W4A4", "--checkpoint", "fp/train/last.pt",
                 "--epochs", "1", "--flatness", "off", *QUICK)
    assert p.returncode == 0, p.stderr[-2000:]
    before = (d / "m/train/last.pt").read_bytes()
    for argv, words in ((["export", "--run", "m", "--bits", "W8A8"], ["--bits W8A8", "W4A4"]),
                        (["export", "--run", "m", "--rounding", "adaround"], ["--rounding", "QAT"]),
                        (["export", "--run", "m", "--fast"], ["--fast"]),
                        (["train", "--run", "m2", "--checkpoint", "m/train/last.pt", *QUICK[:2]], ["QAT checkpoint"]),
                        (["train", "--run", "m", "--resume", *QUICK[:2]], ["QAT run", "--qat"])):
        p = _plateau(d, *argv)
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, \
            (argv, p.stderr)
        assert all(w in p.stderr for w in words), (argv, p.stderr)
    assert (d / "m/train/last.pt").read_bytes() == before and not (d / "m/export").exists()


@pytest.mark.slow
def test_qat_under_torchrun(fp_run):
    """Two gloo processes train a QAT run (the two-view objective: one forward per backward under DDP)."""
    d = fp_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "plateau.train", "--", "--run", "ddp", "--qat", "--bits", "W2A4", "--method", "cr",
           "--checkpoint", "fp/train/last.pt", "--epochs", "1", "--threads", "1", *QUICK]
    res = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((d / "ddp/train/report.json").read_text())
    assert report["world_size"] == 2 and report["quant_gap"]["qat"]
    ck = torch.load(d / "ddp/train/last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ck["model"]) and "qat" in ck


def test_qat_on_a_transformer():
    """A tiny timm ViT: every objective trains it (teacher intervention at the residual adds, the classifier's
    input is the class token), and the exported reference simulates what the net computes."""
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, depth=2, embed_dim=32, num_heads=2,
                     mlp_ratio=2.0).eval()
    net = build_qat(m, [torch.randn(16, 3, 16, 16)], qat_quant_config("W4A4", False))
    assert len(net.taps) >= 4 and not net.bn_eps  # patch embedding + two residual adds per block; no BatchNorm
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for method in QAT_METHODS:
        cfg = TrainConfig(qat=True, method=method, bits="W4A4", lr=1e-3, kd=0.5)
        opt = make_optimizer(net, cfg)
        ctx = StepContext(net=net.train(), model=net, injector=None, optimizer=opt,
                          criterion=torch.nn.CrossEntropyLoss(), cfg=cfg, step=0, total_steps=4)
        loss, _ = cfg.training_method.step(ctx, x, y)
        opt.step()
        net.after_step()
        assert torch.isfinite(loss), method
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net.to_reference().simulate(x))


def test_makefile_qat_variables():
    """`make train QAT=1 METHOD=ti` passes --qat and the method; `make export` passes --bits only when BITS is given
    (a QAT run exports at the bits it trained at)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def dry(*argv: str) -> str:
        p = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(root), *argv], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout

    t = dry("train", "QAT=1", "BITS=W2A4", "CKPT=x.pt", "METHOD=ti")
    assert "--qat" in t and "--method 'ti'" in t and "--bits 'W2A4'" in t and "--checkpoint 'x.pt'" in t
    assert "--qat" not in dry("train")
    assert "--bits" not in dry("export") and "--bits 'W4A8'" in dry("export", "BITS=W4A8")


def test_default_learning_rates_are_the_measured_ones():
    """--lr left open: QAT with BatchNorm frozen (above 2 bits) takes SGD 0.001 or AdamW 3e-4 (the best measured on
    ResNet-20 W4A4; AdamW's general hundredth-of-SGD rule would give 1e-5), with BN on batch statistics (2 bits)
    fine-tuning's rate; flat fine-tuning and training from scratch are untouched."""
    from plateau.train.cli import default_lr

    def lr(**kw) -> float:
        finetune = kw.pop("finetune", True)
        return default_lr(TrainConfig(**kw), finetune)

    assert lr(qat=True, method="lsq", bits="W4A4") == pytest.approx(1e-3)
    assert lr(qat=True, method="lsq", bits="W4A4", optimizer="adamw") == pytest.approx(3e-4)
    assert lr(qat=True, method="lsq", bits="W2A2") == pytest.approx(1e-2)
    assert lr(qat=True, method="lsq", bits="W2A2", optimizer="adamw") == pytest.approx(1e-4)
    assert lr(method="gaussian", optimizer="adamw") == pytest.approx(1e-4)
    assert lr(method="gaussian", finetune=False) == pytest.approx(0.1)
