"""The numerics, three ways: golden vectors by hand, exact equality with ONNX's own reference, round trips."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from plateau.qconfig import QuantConfig
from plateau.quant import (
    INT8,
    UINT8,
    QType,
    choose_qparams,
    conv_multiplier,
    dequantize_np,
    fake_quantize,
    mean_multiplier,
    pack_int4,
    parse_bits,
    quantize,
    quantize_np,
    requant_multiplier,
    requantize,
    unpack_int4,
)


def test_round_half_to_even_and_saturation_golden():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1000.0, -1000.0], np.float32)
    assert quantize_np(x, 1.0, 0, INT8).tolist() == [0, 2, 2, 0, -2, -2, 127, -128]
    assert quantize_np(x, 1.0, 128, UINT8).tolist() == [128, 130, 130, 128, 126, 126, 255, 0]
    t = quantize(torch.from_numpy(x), 1.0, 0, INT8)
    assert t.tolist() == [0, 2, 2, 0, -2, -2, 127, -128]


def test_int4_and_narrow_ranges():
    assert (QType(4).qmin, QType(4).qmax) == (-8, 7)
    assert (QType(4, narrow=True).qmin, QType(4, narrow=True).qmax) == (-7, 7)
    assert (QType(8, narrow=True).qmin, QType(8, narrow=True).qmax) == (-127, 127)
    # 2-bit weights (W2A*: QuantConfig.weight_qtype is narrow) are ternary: -1, 0, 1 times the channel's scale
    assert (QType(2, narrow=True).qmin, QType(2, narrow=True).qmax) == (-1, 1)
    assert QuantConfig.from_bits("W2A8").weight_qtype() == QType(2, signed=True, narrow=True)
    assert (QType(4, signed=False).qmin, QType(4, signed=False).qmax) == (0, 15)
    assert quantize_np(np.array([9.0, -9.0], np.float32), 1.0, 0, QType(4)).tolist() == [7, -8]


@pytest.mark.parametrize("dtype,qt,zp", [(TensorProto.INT8, INT8, -3), (TensorProto.UINT8, UINT8, 131)])
def test_numpy_oracle_equals_onnx_reference_quantize_linear(dtype, qt, zp):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 20).astype(np.float32)
    x[:8] = [0.5, 1.5, 2.5, -0.5, -1.5, 1e6, -1e6, 0.0]
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    g = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                          [helper.make_tensor_value_info("y", dtype, [4096])],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [0.37]),
                           helper.make_tensor("z", dtype, [], [zp])])
    ref = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    expected = ref.run(None, {"x": x})[0]
    np.testing.assert_array_equal(quantize_np(x, np.float32(0.37), zp, qt), expected)
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), np.float32(0.37), zp, qt).numpy(), expected)


def test_choose_qparams_represents_zero_exactly():
    for lo, hi in [(-1.3, 5.2), (0.0, 3.0), (-2.0, -1.0), (0.1, 0.2)]:
        s, z = choose_qparams(lo, hi, INT8, symmetric=False)
        assert dequantize_np(quantize_np(np.float32(0.0), s, z, INT8), s, z) == 0.0
    s, z = choose_qparams(np.array([-1.0, -4.0]), np.array([2.0, 1.0]), QType(8, narrow=True), symmetric=True)
    np.testing.assert_allclose(s, [2.0 / 127, 4.0 / 127], rtol=1e-6)
    assert z.tolist() == [0, 0]


def test_fake_quantize_forward_equals_qdq_and_gradient_is_straight_through():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    y = fake_quantize(x, 0.05, 0, QType(4))
    q = quantize(x.detach(), 0.05, 0, QType(4))
    torch.testing.assert_close(y.detach(), (q * 0.05).float())
    y.sum().backward()
    r = torch.round(x.detach() / 0.05)
    inside, outside = (r >= -8) & (r <= 7), (r < -8) | (r > 7)  # values on the end levels are inside
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)


def test_fake_quantize_scale_gradient_is_lsq():
    """d/ds of the fake-quantized value: round(x/s) - x/s on the grid, the saturated level outside (LSQ); the
    forward with a per-channel learnable scale is still exactly dequantize(quantize(x)), ties included."""
    torch.manual_seed(0)
    x = torch.randn(6, 50) * 2
    x[0, :4] = torch.tensor([0.25, 0.75, -1.25, 2.5])  # ties at scale 0.5
    s = torch.tensor([0.5, 0.3, 0.2, 0.7, 0.1, 0.05]).requires_grad_()
    qt = QType(3, narrow=True)
    y = fake_quantize(x, s, 0, qt, axis=0)
    ref = quantize(x, s.detach(), 0, qt, axis=0) * s.detach()[:, None]
    assert torch.equal(y.detach(), ref)
    y.sum().backward()
    v = x / s.detach()[:, None]
    r = torch.round(v)
    want = torch.where((r >= qt.qmin) & (r <= qt.qmax), r - v, r.clamp(qt.qmin, qt.qmax)).sum(1)
    torch.testing.assert_close(s.grad, want)


def test_fake_quantize_with_zero_point_saturates_both_ends_and_grads_match_the_unfused_form():
    """A uint8 point with its zero point at qmin (the level below the range is 0, like an in-range value on the
    grid) and a signed one off centre: forward = dequantize(quantize(x)); x's gradient is 1 exactly in range
    (the end levels included) and 0 outside; the scale's is LSQ's, summed with a dot product."""
    torch.manual_seed(1)
    for qt, zp in [(QType(8, signed=False), 0), (QType(4), -3)]:
        x = torch.cat([torch.randn(300) * 3, torch.tensor([-50.0, 50.0, 0.0])])
        s = torch.tensor(0.04 if qt.bits == 8 else 0.3, requires_grad=True)
        xr = x.clone().requires_grad_()
        y = fake_quantize(xr, s, zp, qt)
        q = quantize(x, s.detach(), zp, qt)
        assert torch.equal(y.detach(), (q - zp) * s.detach())
        g = torch.randn_like(x)
        y.backward(g)
        v = x / s.detach()
        r = torch.round(v) + zp
        inside = (r >= qt.qmin) & (r <= qt.qmax)
        assert inside.any() and (~inside).any()
        assert torch.equal(xr.grad, torch.where(inside, g, torch.zeros(())))
        d = torch.where(inside, torch.round(v) - v, r.clamp(qt.qmin, qt.qmax) - zp)
        torch.testing.assert_close(s.grad, (g * d).sum())


def test_requantize_matches_formula_and_folds_relu():
    acc = torch.tensor([[-300.0, -1.0, 0.0, 77.0, 1e6]]).T.reshape(1, 5)
    m = torch.tensor(np.float32(0.02))
    out = requantize(acc, m, -128, INT8, relu=True, axis=None)
    assert out.tolist() == [[-128, -128, -128, -126, 127]]
    out = requantize(acc, m, 3, INT8, relu=False, axis=None)
    assert out.tolist() == [[-3, 3, 3, 5, 127]]  # -6 + 3, round(-0.02)=0, round(1.54)=2


def test_conv_multiplier_is_float32_in_fixed_order():
    m = conv_multiplier(0.1, np.array([0.3, 0.7], np.float32), 0.05)
    expect = (np.float32(np.float32(0.1) * np.float32(0.3)) / np.float32(0.05)).astype(np.float32)
    assert m.dtype == np.float32 and m[0] == expect


def test_mean_multiplier_is_float32_in_fixed_order():
    """The GAP / avgpool multiplier is computed in float32 operations, the order onnxruntime and the compiled kernels
    use; rounding the float64 quotient once instead differs in the last bit for some (with K = 49, a 7x7 pool)."""
    rng = np.random.default_rng(0)
    sx, sy = rng.uniform(1e-3, 1, 2000).astype(np.float32), rng.uniform(1e-3, 1, 2000).astype(np.float32)
    got = np.array([mean_multiplier(a, b, 49) for a, b in zip(sx, sy, strict=True)])
    assert got.dtype == np.float32 and np.array_equal(got, sx / (sy * np.float32(49)))
    assert not np.array_equal(got, (sx.astype(np.float64) / (sy.astype(np.float64) * 49)).astype(np.float32))
    per_position = mean_multiplier(0.1, 0.05, np.array([[4, 6], [6, 9]]))
    assert per_position.shape == (2, 2) and per_position[1, 1] == mean_multiplier(0.1, 0.05, 9)


def test_requant_multiplier_reconstructs():
    for m in [0.5, 0.0013, 0.9999999, 3.7]:
        mult, shift = requant_multiplier(m)
        assert abs(int(mult) * 2.0 ** (-(31 + int(shift))) - m) / m < 1e-9


def test_int4_packing_round_trip_and_layout():
    v = np.array([1, -2, 7, -8, 3], np.int8)
    p = pack_int4(v)
    assert p.tolist() == [0xE1, 0x87, 0x03]  # low nibble first
    np.testing.assert_array_equal(unpack_int4(p, 5), v)


def test_parse_bits():
    assert parse_bits("w4a8") == (4, 8)
    for bad in ["W9A8", "8", "W4", "WxA8"]:
        with pytest.raises(ValueError, match="W<bits>A<bits>"):
            parse_bits(bad)


def test_onnx_int4_initializer_uses_our_packing():
    from onnx import numpy_helper

    v = np.array([[1, -2], [7, -8]], np.int8)
    t = helper.make_tensor("w", TensorProto.INT4, [2, 2], pack_int4(v).tobytes(), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), v)
    assert onnx.__version__
