"""AveragePool on integers: exact window sums and a per-position requantize, bit-exact with the reference
(export's run_graph_int) and within one step of onnxruntime, on the host (NHWC, VNNI) and under qemu
(arm64)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from plateau.compile import compile_onnx
from plateau.export import QuantConfig, quantize_model, to_qdq_onnx
from plateau.export.validate import compare_logits, ort_session


class _Pools(nn.Module):
    """conv -> AvgPool(3, 2, pad 1, count_include_pad=False) -> conv -> AvgPool(2) -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.p1 = nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.c2, self.p2 = nn.Conv2d(8, 16, 3, padding=1), nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p2(torch.relu(self.c2(self.p1(torch.relu(self.c1(x))))))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    torch.manual_seed(0)
    m = _Pools().eval()
    m.plateau_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}
    ref = quantize_model(m, [torch.randn(64, 3, 16, 16)], QuantConfig())
    path = tmp_path_factory.mktemp("avgpool") / "m.onnx"
    onnx.save(to_qdq_onnx(ref), str(path))
    return ref, path


@pytest.mark.parametrize("target", ["host", "arm64"])
def test_avgpool_is_integer_and_exact(pooled, tmp_path, target):
    ref, path = pooled
    m = compile_onnx(path, target, tmp_path)
    assert m["float_islands"] == [] and m["ops"]["float_conv2d"] == 0, m["float_islands"]
    x = torch.randn(32, 3, 16, 16)
    if target == "host":
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "model.so")), tvm.cpu())
        ours = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    else:
        from plateau import runtime

        if runtime.sysroot_status() is None or shutil.which("qemu-aarch64") is None:
            pytest.skip("arm64 sysroot / qemu not set up (make arm64-sysroot)")
        ours = runtime.run_artifact(tmp_path, x.numpy(), device="qemu").outputs
    c = compare_logits(ours, ref(x).numpy(), ref.output_step)
    assert c["bit_exact"] == 1.0, c
    ort = compare_logits(ort_session(path).run(None, {"input": x.numpy()})[0], ref(x).numpy(),
                         ref.output_step)
    assert ort["max_steps"] <= 1 and ort["top1_agreement"] >= 0.99, ort
    assert np.isfinite(ours).all()
