"""Export: graph capture, the reference's numerics, the QDQ file's structure, and onnxruntime held to the reference."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from plateau.data import SYNTHETIC, batches, load_split
from plateau.errors import PlateauError
from plateau.export import QuantConfig, capture, load_reference, quantize_model, to_float_onnx, to_qdq_onnx
from plateau.export.stage import export_model
from plateau.export.validate import compare_logits, ort_session
from plateau.models import create_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data():
    test = load_split(SYNTHETIC, "test")
    xs = [x for x, _ in batches(test, 64, [0.5] * 3, [0.25] * 3, limit=256)]
    return xs[:2], torch.cat(xs[2:])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("small_cnn")
    # Non-trivial BN statistics, so folding is exercised.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def test_capture_folds_bn_and_fuses_relu(model):
    g = capture(model, [1, 3, 32, 32])
    ops = [n.op for n in g.nodes]
    assert ops.count("conv") == 5 and "add" in ops and ops[-1] == "linear"
    assert all(n.bias is not None for n in g.weighted())
    assert g.node("add").relu and not any(n.op == "relu" for n in g.nodes)


def test_unsupported_op_names_the_module():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.Hardswish()

        def forward(self, x):
            return self.act(self.conv(x))

    with pytest.raises(PlateauError, match="module 'act' \\(Hardswish\\)"):
        capture(Odd(), [1, 3, 8, 8])


def test_w8a8_reference_tracks_float(model, data):
    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    fp, q = ref.float_forward(x), ref(x)
    assert (fp.argmax(1) == q.argmax(1)).float().mean() >= 0.95
    # The integer-exact reference and the float fake-quant simulation agree but for rare ties.
    c = compare_logits(ref.simulate(x).numpy(), q.numpy(), ref.output_step)
    assert c["within_one_step"] >= 0.999


@pytest.mark.parametrize("bits", ["W8A8", "W4A8", "W4A4"])
@pytest.mark.parametrize("layout", ["widened", "native"])
def test_qdq_file_structure(model, data, bits, layout):
    ref = quantize_model(model, data[0], QuantConfig.from_bits(bits))
    m = to_qdq_onnx(ref, {"plateau.bits": bits}, four_bit=layout)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == 21
    inits = {t.name: t for t in m.graph.initializer}
    wq = [t for n, t in inits.items() if n.endswith(".wq")]
    # 4-bit weights are INT4 initializers in both layouts (half a byte each in the file).
    want = TensorProto.INT8 if bits.startswith("W8") else TensorProto.INT4
    assert len(wq) == 6 and all(t.data_type == want for t in wq)
    # No float weight is re-quantized at run time: every QuantizeLinear quantizes an activation.
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in m.graph.node)
    producer = {o: n for n in m.graph.node for o in n.output}
    per_axis = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(tuple(
        w.name[:-2] for w in wq)) and n.input[0].endswith((".wq", ".w8"))]
    assert all(a.i == 0 for n in per_axis for a in n.attribute if a.name == "axis") and len(per_axis) == 6
    casts = [producer[n.input[0]] for n in per_axis if n.input[0] in producer]
    if layout == "widened" and want == TensorProto.INT4:
        # ... read through Cast(INT8) in the widened layout
        assert len(casts) == 6 and all(c.op_type == "Cast" and c.attribute[0].i == TensorProto.INT8 for c in casts)
    else:
        assert casts == []
    # Bias scales are written as Mul(s_x, s_w) of scales the file holds, equal to the reference's bias scale.
    for n in ref.graph.weighted():
        mul = producer[f"{n.name}.bs"]
        assert mul.op_type == "Mul" and mul.input[1] == f"{n.name}.ws" and mul.input[0] in inits
        s_b = np.float32(onnx.numpy_helper.to_array(inits[mul.input[0]])) * onnx.numpy_helper.to_array(
            inits[mul.input[1]])
        np.testing.assert_array_equal(s_b, ref.weights[n.name].bias_scale.numpy())
    zp_types = {t.data_type for n, t in inits.items() if n.endswith(".zp")}
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    if bits == "W4A4" and layout == "native":
        assert TensorProto.INT4 in zp_types and not clips
    elif bits == "W4A4":
        # 4-bit activations: QuantizeLinear to INT8, then a clamp on the integers to -8..7
        assert zp_types == {TensorProto.INT8} and clips
        for c in clips:
            lo, hi = (onnx.numpy_helper.to_array(inits[i]) for i in c.input[1:])
            assert (int(lo), int(hi)) == (-8, 7) and producer[c.input[0]].op_type == "QuantizeLinear"
    else:
        assert zp_types == {TensorProto.INT8} and not clips
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["plateau.bits"] == bits and meta["plateau.four_bit_layout"] == layout


@pytest.mark.parametrize("bits", ["W8A8", "W4A8", "W4A4", "W3A3", "W8A6"])
def test_onnxruntime_matches_reference(model, data, bits, tmp_path):
    """In the widened layout onnxruntime runs every conv and the classifier's Gemm in its integer kernels, at any
    bit width, and equals the reference (but for a rare near-tie in its QLinearAdd's own requantization)."""
    from plateau.export.validate import ort_kernels

    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits(bits))
    onnx.save(to_qdq_onnx(ref), tmp_path / "q.onnx")
    assert ort_kernels(tmp_path / "q.onnx") == {"integer": 6, "float": 0, "ops": {"QGemm": 1, "QLinearConv": 5}}
    out = ort_session(tmp_path / "q.onnx").run(None, {"input": x.numpy()})[0]
    c = compare_logits(out, ref(x).numpy(), ref.output_step)
    assert c["max_steps"] <= 1 and c["bit_exact"] >= 0.999 and c["top1_agreement"] == 1.0, c


@pytest.mark.parametrize("bits", ["W4A8", "W4A4"])
def test_native_int4_runs_as_float_convs_in_onnxruntime(model, data, bits, tmp_path):
    """The native INT4 layout has the same meaning (onnxruntime agrees within float noise), but onnxruntime runs
    those convs in float: ort_kernels says so, which the export report shows."""
    from plateau.export.validate import ort_kernels

    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits(bits))
    onnx.save(to_qdq_onnx(ref, four_bit="native"), tmp_path / "q.onnx")
    assert ort_kernels(tmp_path / "q.onnx")["integer"] == 0
    out = ort_session(tmp_path / "q.onnx").run(None, {"input": x.numpy()})[0]
    c = compare_logits(out, ref(x).numpy(), ref.output_step)
    assert c["max_steps"] <= 2 and c["top1_agreement"] >= 0.99, c


def test_activations_saturate_at_their_own_width(model, data, tmp_path):
    """A3 activations: onnxruntime's integer outputs of every quantization point stay in -4..3 and equal the
    reference's (an INT4 QuantizeLinear alone would saturate at -8..7)."""
    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits("W4A3"))
    from plateau.export.validate import ort_quant_points

    got = ort_quant_points(to_qdq_onnx(ref, four_bit="native"), list(ref.acts))(x[:16].numpy())
    want = ref.intermediates(x[:16])
    for k in ref.acts:
        if ref.acts[k].qtype.bits == 3:
            assert got[f"{k}.q"].min() >= -4 and got[f"{k}.q"].max() <= 3
        np.testing.assert_array_equal(got[f"{k}.q"].astype(np.int64), want[k].numpy().astype(np.int64), err_msg=k)


def test_float_onnx_matches_folded_model(model, data, tmp_path):
    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    onnx.save(to_float_onnx(ref), tmp_path / "f.onnx")
    out = ort_session(tmp_path / "f.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_int4_file_is_small(tmp_path):
    torch.manual_seed(0)
    m = create_model("cifar_resnet20").eval()
    calib = [torch.randn(16, 3, 32, 32)]
    ref = quantize_model(m, calib, QuantConfig.from_bits("W4A8"))
    onnx.save(to_qdq_onnx(ref), tmp_path / "q4.onnx")
    onnx.save(to_float_onnx(ref), tmp_path / "f.onnx")
    ratio = (tmp_path / "q4.onnx").stat().st_size / (tmp_path / "f.onnx").stat().st_size
    assert ratio <= 0.15, ratio


def test_relu_elision_keeps_values(model, data, tmp_path):
    """Conv/Add + ReLU with the output zero point at qmin are written without the Relu node; the values agree."""
    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    m = to_qdq_onnx(ref)
    assert not any(n.op_type == "Relu" for n in m.graph.node)
    onnx.save(m, tmp_path / "q.onnx")
    out = ort_session(tmp_path / "q.onnx").run(None, {"input": x.numpy()})[0]
    assert compare_logits(out, ref(x).numpy(), ref.output_step)["within_one_step"] >= 0.99


def test_reference_round_trip(model, data, tmp_path):
    calib, x = data
    model.plateau_name = "small_cnn"
    ref, _ = export_model(model, calib, QuantConfig.from_bits("W8A8"), tmp_path)
    again = load_reference(tmp_path / "reference.pt")
    torch.testing.assert_close(again(x), ref(x), rtol=0, atol=0)


def test_config_errors():
    with pytest.raises(PlateauError, match="W<bits>A<bits>"):
        QuantConfig.from_bits("W16A8")
    with pytest.raises(PlateauError, match="unknown activation calibration 'kl2'"):
        QuantConfig(act_calibration="kl2")
    with pytest.raises(PlateauError, match="calibration set is empty"):
        quantize_model(create_model("small_cnn"), [], QuantConfig())


def test_layer_bits_and_first_last(model, data):
    from plateau.calibrate import weight_bits

    ref = quantize_model(model, data[0], QuantConfig.from_bits("W4A4", keep_first_last_8bit=True,
                                                               layer_bits={"res.a.0": 6}))
    wb = {n.module: ref.weights[n.name].qtype.bits for n in ref.graph.weighted()}
    assert wb["stem.0.0"] == 8 and wb["fc"] == 8 and wb["res.a.0"] == 6 and wb["down1.0.0"] == 4
    assert ref.acts["x"].qtype.bits == 8
    with pytest.raises(PlateauError, match="not a conv/linear layer"):
        weight_bits(ref.graph, QuantConfig(layer_bits={"nope": 4}))


SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data/cifar10/test").is_dir(), reason="../shared/data/cifar10 is not present")
def test_pretrained_resnet20_w8a8_on_cifar10():
    """Real data: the reference stays within 0.5 points of FP and onnxruntime agrees with it (1000 test images)."""
    from plateau.export.validate import logits_of, ort_fn, top1, torch_fn

    m = create_model("cifar_resnet20", checkpoint=SHARED / "models/cifar-resnet/resnet20-12fca82f.th").eval()
    mean, std = m.plateau_cfg["mean"], m.plateau_cfg["std"]
    train, test = load_split(SHARED / "data/cifar10", "train"), load_split(SHARED / "data/cifar10", "test")
    calib = [x for x, _ in batches(train, 128, mean, std, shuffle=True, limit=512)]
    ref = quantize_model(m, calib, QuantConfig.from_bits("W8A8"))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        onnx.save(to_qdq_onnx(ref), f"{d}/q.onnx")
        ort = logits_of(ort_fn(ort_session(f"{d}/q.onnx")), test, mean, std, limit=1000)
    rl = logits_of(torch_fn(ref), test, mean, std, limit=1000)
    fp = logits_of(torch_fn(ref.float_forward), test, mean, std, limit=1000)
    assert top1(rl, test.labels) >= top1(fp, test.labels) - 0.005
    c = compare_logits(ort, rl, ref.output_step)
    assert c["top1_agreement"] >= 0.999 and c["bit_exact"] >= 0.999 and c["max_steps"] <= 1, c


def test_learned_rounding_beats_nearest_on_reconstruction(model, data):
    """AdaRound's weights stay integers in range and bring the W4 model's logits closer to FP than rounding to
    nearest does, on the calibration images it was fitted on."""
    calib = data[0][:1]
    near = quantize_model(model, calib, QuantConfig.from_bits("W4A8"))
    ada = quantize_model(model, calib, QuantConfig.from_bits("W4A8", rounding="adaround", adaround_iters=40))
    x = torch.cat(calib)
    for n in ada.graph.weighted():
        q = ada.weights[n.name].q
        assert torch.equal(q, q.round()) and q.min() >= -7 and q.max() <= 7
    changed = sum(int((ada.weights[k].q != near.weights[k].q).sum()) for k in near.weights)
    assert changed > 0
    fp = near.float_forward(x)
    err_near = float((near(x) - fp).pow(2).mean())
    err_ada = float((ada(x) - fp).pow(2).mean())
    assert err_ada < err_near, (err_ada, err_near)


def test_reconstruction_units():
    """Per block: each residual block (its convs, the shortcut, the add) is one unit with one input tensor; a
    stretch with no conv/linear joins the unit that follows it."""
    from plateau.export.adaround import _unit_input, reconstruction_units

    g = capture(create_model("cifar_resnet20").eval(), [1, 3, 32, 32])
    units = reconstruction_units(g, per_block=True)
    assert len(units) == 11 and [n.op for n in units[0]] == ["conv"]
    assert all([n.op for n in u][:2] == ["conv", "conv"] and u[-1].op == "add" for u in units[1:10])
    assert [n.op for n in units[4]] == ["conv", "conv", "slice", "pad", "add"]  # option-A shortcut
    assert [n.op for n in units[-1]] == ["gap", "flatten", "linear"]
    assert [_unit_input(u) for u in units[:2]] == ["x", "conv1"]
    assert sum(len(u) for u in units) == len(g.nodes) - 1  # every node but the input, once
    assert [u[0].name for u in reconstruction_units(g, per_block=False)] == [n.name for n in g.weighted()]


def test_block_reconstruction_with_learned_clipping(model, data, tmp_path):
    """Per-block learned rounding with learned activation scales: weights stay integers in range, scales move,
    the int32 biases follow the final scales, the model gets closer to FP than rounding to nearest, and
    onnxruntime still computes what the reference computes."""
    calib, x = data
    cfg = dict(rounding="adaround", adaround_iters=40, reconstruction="block", learn_act_clip=True)
    near = quantize_model(model, calib[:1], QuantConfig.from_bits("W4A4"))
    ada = quantize_model(model, calib[:1], QuantConfig.from_bits("W4A4", **cfg))
    assert sum(ada.acts[k].scale != near.acts[k].scale for k in near.acts) >= 3
    logits = ada.graph.quant_source(ada.graph.output)
    assert ada.acts[logits] == near.acts[logits]  # the logits keep their min-max range
    for n in ada.graph.weighted():
        w = ada.weights[n.name]
        assert torch.equal(w.q, w.q.round()) and w.q.min() >= -7 and w.q.max() <= 7
        s_x = torch.tensor(ada.acts[n.attrs["_in_q"]].scale, dtype=torch.float32)
        assert torch.equal(w.bias_scale, (s_x * w.scale).float())
    xc = torch.cat(calib[:1])
    fp = ada.float_forward(xc)
    assert float((ada(xc) - fp).pow(2).mean()) < float((near(xc) - fp).pow(2).mean())
    onnx.save(to_qdq_onnx(ada), tmp_path / "q.onnx")
    out = ort_session(tmp_path / "q.onnx").run(None, {"input": x.numpy()})[0]
    c = compare_logits(out, ada(x).numpy(), ada.output_step)
    assert c["max_steps"] <= 1 and c["bit_exact"] >= 0.999, c
    with pytest.raises(PlateauError, match="--rounding adaround"):
        QuantConfig(learn_act_clip=True)
    with pytest.raises(PlateauError, match="unknown reconstruction 'net'"):
        QuantConfig(reconstruction="net")


def test_kl_calibration_clips_outliers():
    from plateau.calibrators import ACT_CALIBRATORS, Observer
    from plateau.quant import INT8

    o = Observer()
    t = torch.cat([torch.randn(100000), torch.tensor([60.0])])
    o.update_range(t)
    o.update_hist(t)
    lo, hi = ACT_CALIBRATORS.get("kl").clip(o, INT8, 99.99)
    assert 2.0 < hi < 30.0 and -30.0 < lo < -2.0


def test_mixed_precision_meets_budget_and_spares_sensitive_layers(model, data):
    from plateau.export.sensitivity import choose_bits, layer_sensitivity

    g = capture(model, [1, 3, 32, 32])
    sens = layer_sensitivity(g, data[0][:1], QuantConfig(), bits=(8, 4), method="kl")
    assert all(s[4] >= 0 for s in sens.values())
    choice = choose_bits(g, sens, 6.0)
    size = {n.module: n.weight.numel() for n in g.weighted()}
    assert sum(choice[k] * size[k] for k in size) / sum(size.values()) <= 6.0
    assert set(choice.values()) == {4, 8}
    # The greedy choice lowers the cheapest layers first: making the largest layer very sensitive keeps it at 8.
    big = max(size, key=size.get)
    sens[big] = {8: 0.0, 4: 1e9}
    assert choose_bits(g, sens, 6.0)[big] == 8


def test_mixed_precision_counts_stored_bits(model):
    """The budget is what is stored (int4 up to 4 bits, int8 above): 6 and 3 bits save nothing over 8 and 4, so
    with (8, 6, 4, 3) measured the choice is 8 or 4, a budget under 4 bits is refused in one line, and one of 4
    puts every layer at 4 bits (not 3)."""
    from plateau.export.sensitivity import choose_bits

    g = capture(model, [1, 3, 32, 32])
    sens = {n.module: {8: 0.0, 6: 0.0, 4: float(i + 1), 3: 10.0 * (i + 1)} for i, n in enumerate(g.weighted())}
    assert set(choose_bits(g, sens, 6.0).values()) <= {8, 4}
    assert set(choose_bits(g, sens, 4.0).values()) == {4}
    assert set(choose_bits(g, sens, 8.0).values()) == {8}
    with pytest.raises(PlateauError, match="below 4 bits per weight"):
        choose_bits(g, sens, 3.5)


def test_mixed_precision_gives_back_what_the_last_step_left(model):
    """The smallest layer is the cheapest per bit and goes down first, but the budget needs the largest one down
    too, after which the smallest fits at 8 bits again: it gets its bits back."""
    from plateau.export.sensitivity import choose_bits, stored_bits

    g = capture(model, [1, 3, 32, 32])
    size = {n.module: n.weight.numel() for n in g.weighted()}
    big, small = max(size, key=size.get), min(size, key=size.get)
    sens = {k: {8: 0.0, 4: 1e-9 if k == small else 1.0 if k == big else 1e6} for k in size}
    total = sum(size.values())
    budget = 8.0 - 4.0 * size[big] / total  # exactly the largest layer at 4 bits
    choice = choose_bits(g, sens, budget)
    assert choice[big] == 4 and choice[small] == 8 and set(choice.values()) == {4, 8}
    assert sum(stored_bits(choice[k]) * n for k, n in size.items()) / total <= budget + 1e-9


def test_mixed_precision_keeps_pinned_widths_and_counts_them(model):
    """Widths the user fixed (--keep-first-last-8bit, layer_bits) stay as asked and count in the budget; a budget
    they leave no room for is refused in one line that names them."""
    from plateau.export.sensitivity import choose_bits, stored_bits

    g = capture(model, [1, 3, 32, 32])
    size = {n.module: n.weight.numel() for n in g.weighted()}
    first, last = list(size)[0], list(size)[-1]
    # The first and last layers are the least sensitive: unpinned, they would go to 4 bits first.
    sens = {k: {8: 0.0, 4: 0.0 if k in (first, last) else 1.0 + i} for i, k in enumerate(size)}
    assert choose_bits(g, sens, 7.9)[first] == 4
    pinned = {first: 8, last: 8}
    total = sum(size.values())
    for budget in (4.0 + 4.0 * (size[first] + size[last]) / total, 5.0, 7.9):
        choice = choose_bits(g, sens, budget, pinned)
        assert choice[first] == choice[last] == 8
        assert sum(stored_bits(choice[k]) * n for k, n in size.items()) / total <= budget + 1e-9
    with pytest.raises(PlateauError, match=f"fixed width .*{first}: 8"):
        choose_bits(g, sens, 4.0, pinned)
    with pytest.raises(PlateauError, match="'nope'.*not a conv/linear"):
        choose_bits(g, sens, 6.0, {"nope": 8})


def test_mixed_precision_reads_layer_bits_by_node_name_too(model, data):
    """layer_bits may name a layer by its graph node name, as weight_bits() reads it: mixed precision keeps that
    width (recorded by module path) instead of refusing a name it does not know."""
    from plateau.export.sensitivity import mixed_precision

    g = capture(model, [1, 3, 32, 32])
    layers = g.weighted()
    node = layers[1]
    assert node.name != node.module  # the two spellings differ on this model
    cfg = QuantConfig(weight_bits=4, layer_bits={node.name: 8})
    out = mixed_precision(g, [data[0][0][:8]], cfg, budget=4.0 + 4.0 * node.weight.numel()
                          / sum(n.weight.numel() for n in layers), images=8)
    assert out["pinned"] == {node.module: 8} and out["layer_bits"][node.module] == 8
    with pytest.raises(PlateauError, match=f"fixed width .*{node.module}: 8"):
        mixed_precision(g, [data[0][0][:8]], cfg, budget=4.0, images=8)


def test_fisher_sensitivity_estimates_the_measured_kl(model, data):
    """The second-order (Fisher) estimate stands for the KL measured on the same images: summed over the layers
    within a factor of 1.5 at 4 and at 2 bits, each layer within a factor of 3 (the diagonal, second-order estimate
    leaves a factor of ~1.6 per entry on ResNet-20), the same most and least sensitive layer; the graph's weights
    come back untouched."""
    from plateau.export.sensitivity import layer_sensitivity

    g = capture(model, [1, 3, 32, 32])
    before = {n.name: n.weight.clone() for n in g.weighted()}
    calib = [data[0][0][:64]]
    fisher = layer_sensitivity(g, calib, QuantConfig(), bits=(4, 2), method="fisher")
    kl = layer_sensitivity(g, calib, QuantConfig(), bits=(4, 2), method="kl")
    assert fisher.keys() == kl.keys()
    for b in (4, 2):
        total = sum(v[b] for v in fisher.values()) / sum(v[b] for v in kl.values())
        assert 1 / 1.5 < total < 1.5, (b, total)
        for k in kl:
            assert 1 / 3 < fisher[k][b] / kl[k][b] < 3, (k, b, fisher[k], kl[k])
    for pick in (min, max):
        assert pick(fisher, key=lambda k: fisher[k][4]) == pick(kl, key=lambda k: kl[k][4])
    for n in g.weighted():
        assert not n.weight.requires_grad and torch.equal(n.weight, before[n.name])


def test_sensitivity_uses_the_first_images_and_refuses_none(model, data):
    from plateau.export.sensitivity import _images, layer_sensitivity

    calib = [data[0][0][:10], data[0][0][10:30]]
    assert [len(x) for x in _images(calib, 15)] == [10, 5]
    assert [len(x) for x in _images(calib, None)] == [10, 20]
    with pytest.raises(PlateauError, match="empty"):
        layer_sensitivity(capture(model, [1, 3, 32, 32]), [], QuantConfig())
    with pytest.raises(PlateauError, match="sensitivity measure 'nope'"):
        layer_sensitivity(capture(model, [1, 3, 32, 32]), calib, QuantConfig(), method="nope")


def test_fp32_onnx_input_quantizes_like_the_torch_model(model, data, tmp_path):
    """A float ONNX file from torch.onnx (BN unfolded) reads into the same graph and quantizes identically."""
    from plateau.export import quantize_graph
    from plateau.export.onnx_reader import read_onnx
    from plateau.reference import run_graph

    calib, x = data
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), tmp_path / "m.onnx", input_names=["input"],
                      dynamo=False, opset_version=17)
    g = read_onnx(tmp_path / "m.onnx")
    assert [n.op for n in g.nodes].count("conv") == 5 and g.node(g.output).op == "linear"
    with torch.no_grad():
        torch.testing.assert_close(run_graph(g, x), model(x), atol=1e-4, rtol=1e-4)
    a = quantize_graph(g, calib, QuantConfig.from_bits("W8A8"))
    b = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    c = compare_logits(a(x).numpy(), b(x).numpy(), b.output_step)
    assert c["top1_agreement"] >= 0.99 and c["within_one_step"] >= 0.99
    onnx.checker.check_model(to_qdq_onnx(a))


def test_onnx_input_with_unsupported_op_names_the_node(tmp_path):
    from onnx import helper

    from plateau.export.onnx_reader import read_onnx

    node = helper.make_node("Sigmoid", ["input"], ["y"], name="probs")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    onnx.save(helper.make_model(g), tmp_path / "s.onnx")
    with pytest.raises(PlateauError, match="'probs' \\(Sigmoid\\)"):
        read_onnx(tmp_path / "s.onnx")


def test_float32_accumulation_path_is_exact(model, data, monkeypatch):
    """The reference's fast float32 accumulation equals float64 accumulation exactly."""
    from plateau.ops import layers

    calib, x = data
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    fast = ref(x)
    monkeypatch.setattr(layers, "exact_dtype", lambda *a: torch.float64)
    torch.testing.assert_close(ref(x), fast, rtol=0, atol=0)


def test_ort_u8s8_saturation_is_read_off_the_cpu_flags(tmp_path, monkeypatch):
    import platform

    from plateau.export.validate import ort_u8s8_saturates

    (tmp_path / "avx2").write_text("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    (tmp_path / "vnni").write_text("processor : 0\nflags : fpu avx2 avx512f avx512_vnni\n")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert ort_u8s8_saturates(tmp_path / "avx2") and not ort_u8s8_saturates(tmp_path / "vnni")
    assert ort_u8s8_saturates(tmp_path / "missing")  # unknown x86: no VNNI assumed
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not ort_u8s8_saturates(tmp_path / "avx2")


def test_learned_scale_moves_off_rounding_boundaries():
    """A scale that puts a frequent value exactly on a .5 boundary (where learned clipping likes to settle) is moved
    by a fraction of a percent to where no value sits within the tolerance of one."""
    from plateau.export.adaround import away_from_ties
    from plateau.quant import INT8

    s = 0.02
    v = torch.cat([torch.full((5000,), 4.5 * s), torch.linspace(-1.0, 1.0, 2001)])  # 4.5 steps: a tie
    t = away_from_ties(v, s, INT8, 0)
    assert t != np.float32(s) and abs(t / s - 1) <= 2e-3
    steps = (v.double() / t)
    assert ((steps - steps.floor() - 0.5).abs() < 1e-4).sum() < 5
    clean = torch.linspace(-1.0, 1.0, 1001) * 0.987654
    assert away_from_ties(clean, 0.0123457, INT8, 0) == np.float32(0.0123457)  # nothing near a tie: unchanged


def test_export_report_counts_onnxruntime_kernels_and_flags_u8s8(tmp_path, monkeypatch):
    """`plateau export` on a 4-bit model: onnxruntime ran every conv and the Gemm in integer kernels (widened layout),
    the native layout's report says they ran in float; uint8 activations on a CPU whose onnxruntime U8S8 kernels
    saturate get a note instead of passing for a check."""
    import json

    from plateau.cli import main as cli

    torch.manual_seed(0)
    torch.save({"model": create_model("small_cnn").state_dict(), "model_name": "small_cnn"}, tmp_path / "ck.pt")
    base = ["export", "--checkpoint", str(tmp_path / "ck.pt"), "--data", "synthetic", "--calib-images", "64",
            "--eval-limit", "64", "--fast"]
    assert cli([*base, "--run", str(tmp_path / "w4"), "--bits", "W4A8"]) == 0
    rep = json.loads((tmp_path / "w4/export/report.json").read_text())
    assert rep["onnxruntime_kernels"] == {"integer": 6, "float": 0, "ops": {"QGemm": 1, "QLinearConv": 5}}
    assert rep["four_bit_layout"] == "widened" and rep["onnxruntime_vs_reference"]["max_steps"] <= 1
    assert "onnxruntime's kernels: 6 integer, 0 float" in (tmp_path / "w4/export/report.md").read_text()
    assert cli([*base, "--run", str(tmp_path / "nat"), "--bits", "W4A8", "--four-bit-layout", "native"]) == 0
    md = (tmp_path / "nat/export/report.md").read_text()
    assert "0 integer, 6 float" in md and "no integer kernel for INT4" in md
    monkeypatch.setattr("plateau.export.stage.ort_u8s8_saturates", lambda: True)
    assert cli([*base, "--run", str(tmp_path / "u8"), "--act-unsigned"]) == 0
    assert "vpmaddubsw" in json.loads((tmp_path / "u8/export/report.json").read_text())["onnxruntime_note"]


@pytest.mark.slow
def test_cli_mixed_precision_reports_its_choice(model, tmp_path):
    """`plateau export --mixed-precision` writes the choice into report.json / report.md (the per-layer table
    into the manifest), the exported weights are at the chosen widths, and --keep-first-last-8bit's layers stay at
    8 bits."""
    import json
    import subprocess
    import sys

    torch.save(model.state_dict(), tmp_path / "ck.pt")
    cmd = [sys.executable, "-m", "plateau", "export", "--run", "r", "--model", "small_cnn", "--checkpoint", "ck.pt",
           "--data", "synthetic", "--bits", "W4A8", "--fast", "--mixed-precision", "6", "--calib-images", "64",
           "--eval-limit", "64", "--keep-first-last-8bit"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "r/export/report.json").read_text())
    m = rep["mixed_precision"]
    assert m["sensitivity_measure"] == "kl" and m["sensitivity_images"] == 64 and m["avg_stored_bits"] <= 6.0
    assert "Mixed precision: weights stored in" in (tmp_path / "r/export/report.md").read_text()
    man = json.loads((tmp_path / "r/export/manifest.json").read_text())
    assert man["mixed_precision"]["layer_bits"] == m["layer_bits"] == rep["config"]["layer_bits"]
    assert set(man["mixed_precision"]["sensitivity"]) == set(m["layer_bits"])
    ref = load_reference(tmp_path / "r/export/reference.pt")
    for n in ref.graph.weighted():
        q = ref.weights[n.name].q
        assert q.abs().max() == 2 ** (m["layer_bits"][n.module] - 1) - 1, n.module  # its grid's largest level
    assert set(m["layer_bits"].values()) == {4, 8}  # the budget bought some layers 8 bits, the rest --bits' 4
    first, last = list(m["layer_bits"])[0], list(m["layer_bits"])[-1]
    assert m["pinned"] == {first: 8, last: 8} and m["layer_bits"][first] == m["layer_bits"][last] == 8
    assert "Kept at the width asked for" in (tmp_path / "r/export/report.md").read_text()
    assert man["config"]["img_size"] == 32  # the image size later stages load data at (was the layer sizes' dict)
