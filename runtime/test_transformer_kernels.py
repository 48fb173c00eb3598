"""A tiny timm ViT (2 blocks, width 32) through export -> compile -> run: every Linear, both attention matmuls
and the patch embedding lower to integer kernels. The default export (GELU as the table of its island, Softmax and
LayerNorm in float64 from exact integer sums) and the integer-only export give the reference's logits bit for bit
on the host and on arm64 (sdot) under qemu; float32 islands (--no-exact-islands) agree within a step."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from plateau.compile import compile_onnx
from plateau.export import QuantConfig, quantize_model, to_qdq_onnx
from plateau.models import create_model
from plateau.runtime import run_artifact


def _steps(got: np.ndarray, want: np.ndarray, step: float) -> np.ndarray:
    return np.rint(np.abs(got.astype(np.float64) - want.astype(np.float64)) / step)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, depth=2, embed_dim=32, num_heads=2,
                         mlp_ratio=2.0).eval()
    calib = [torch.randn(32, 3, 16, 16) * 0.5]
    x = (torch.randn(48, 3, 16, 16) * 0.5).numpy()
    return model, calib, x


MODES = {"exact": ("W8A8", {}), "integer-only": ("W8A8", {"integer_only": True}),
         "float32-islands": ("W8A8", {"exact_islands": False}),
         "exact-W4A8": ("W4A8", {}), "exact-W4A4": ("W4A4", {})}  # 4-bit weights packed two per byte


def _build(tmp_path, tiny_vit, mode: str, target: str = "host"):
    model, calib, x = tiny_vit
    bits, kw = MODES[mode]
    ref = quantize_model(model, calib, QuantConfig.from_bits(bits, **kw))
    path = tmp_path / "model_qdq.onnx"
    onnx.save(to_qdq_onnx(ref), str(path))
    m = compile_onnx(path, target, tmp_path / target)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    return ref, m, want


@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_vit_host_kernels(tmp_path, tiny_vit, mode):
    ref, m, want = _build(tmp_path, tiny_vit, mode)
    ops = m["ops"]
    assert m["weight_bits"] == [int(MODES[mode][0][1])]
    # patch embedding; q, k, v, proj, fc1, fc2 per block and the head (13 Linear); Q.K^T and P.V per block
    assert ops["int_conv2d"] == 1 and ops["int_matmul"] == 17
    assert ops["float_conv2d"] == 0 and ops["float_matmul"] == 0
    floats = sorted(k for k in ops if k.startswith("float_op:"))
    if mode != "float32-islands":
        assert floats == [] and m["float_islands"] == []
    else:  # the float islands the export chose, and nothing else
        assert floats == ["float_op:nn.gelu", "float_op:nn.layer_norm", "float_op:nn.softmax"]
        assert (ops["float_op:nn.gelu"], ops["float_op:nn.layer_norm"], ops["float_op:nn.softmax"]) == (2, 5, 2)
    got = run_artifact(tmp_path / "host" / "model.so", tiny_vit[2]).outputs
    d = _steps(got, want, ref.output_step)
    if mode != "float32-islands":
        assert (d == 0).all(), f"{int((d != 0).sum())} of {d.size} logits differ (max {d.max()} steps)"
    else:  # float32 islands: a rounding tie may land the other way; the logits stay within a step
        assert (d <= 1).mean() >= 0.99 and (got.argmax(1) == want.argmax(1)).mean() >= 0.97, d.max()


@pytest.mark.qemu
@pytest.mark.parametrize("mode,target", [("exact", "arm64-dotprod"), ("integer-only", "arm64-dotprod"),
                                         ("exact-W4A8", "arm64-dotprod"), ("exact", "arm64-i8mm")])
def test_tiny_vit_bit_exact_on_arm64(tmp_path, tiny_vit, sysroot, mode, target):
    ref, m, want = _build(tmp_path, tiny_vit, mode, target=target)
    assert m["ops"]["int_matmul"] == 17 and m["float_islands"] == []
    got = run_artifact(tmp_path / target / "model.so", tiny_vit[2], device="qemu").outputs
    np.testing.assert_array_equal(_steps(got, want, ref.output_step), 0)


@pytest.mark.parametrize("target,mnemonic", [("arm64-dotprod", "sdot"), ("arm64-i8mm", "sdot"),
                                             ("x86-vnni", "vpdpbusd")])
def test_every_tiny_vit_matmul_runs_the_dot_instruction(tmp_path, tiny_vit, target, mnemonic):
    """In the tiny ViT's assembly every matmul kernel (q, k, v, proj, fc1, fc2, head, and both attention
    matmuls of two activations per block) holds the target's dot instruction; arm64-i8mm's attention kernels
    run sdot (smmla's pixel pairs do not fit them)."""
    from plateau.compile.asm import fused_multiply_adds, instructions_per_function
    from plateau.compile.compiler import build, import_onnx, lower_for_target
    from plateau.compile.lower import lower_qdq
    from plateau.compile.targets import get_target

    model, calib, _ = tiny_vit
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    onnx.save(to_qdq_onnx(ref), str(tmp_path / "m.onnx"))
    tgt = get_target(target)
    mod, _ = import_onnx(tmp_path / "m.onnx")
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    asm = ex.mod.imports[0].inspect_source("asm")
    found = instructions_per_function(asm, mnemonic)
    matmuls = {f: n for f, n in found.items() if "matmul" in f and f.startswith("fused_")}
    attention = [f for f in matmuls if "act_matmul" in f]
    assert len(attention) == 4 and all(n > 0 for n in matmuls.values()), found  # 2 blocks x (Q.K^T, P.V)
    assert len(matmuls) >= 4 + 3, found  # and the Linear layers (kernels of one shape are shared)
    # Plateau's tiled kernels, not TVM's generic matmul (which LLVM may vectorize into the same instruction):
    # only the 10-class head (10 outputs: no whole blocks of the kernel's lanes) may stay generic
    generic = [f for f in matmuls if "plateau_" not in f]
    assert len(generic) <= 1, generic
    # TVM compiles with fp-contract=fast: a fused multiply-add (a residual add, a requantize, the float64
    # LayerNorm's (xc / den) * G + B) would round once where the reference rounds twice (no_contraction.py
    # fences the products adds read): none in any precision.
    assert not fused_multiply_adds(asm)


@pytest.mark.slow
def test_vit_tiny_224_shape_bit_exact_on_host(tmp_path):
    """ViT-Tiny's 224x224 shape (197 tokens: a prime count, so every token-row and attention tile is padded;
    width 192, 3 heads of 64), one block, random weights: the compiled library equals the reference on every
    logit."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=224, depth=1).eval()
    calib = [torch.randn(8, 3, 224, 224) * 0.5]
    x = (torch.randn(4, 3, 224, 224) * 0.5).numpy()
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    onnx.save(to_qdq_onnx(ref), str(tmp_path / "m.onnx"))
    m = compile_onnx(tmp_path / "m.onnx", "host", tmp_path / "host")
    assert m["ops"]["int_matmul"] == 9 and m["float_islands"] == []  # q, k, v, proj, fc1, fc2, head; 2 attention
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = run_artifact(tmp_path / "host" / "model.so", x).outputs
    np.testing.assert_array_equal(_steps(got, want, ref.output_step), 0)
