"""Hold onnxruntime to the fake-quant reference: top-1 of each, top-1 agreement, logit differences in output steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from plateau.data import ImageSet, batches, progress

__all__ = ["logits_of", "ort_session", "ort_kernels", "ort_quant_points", "ort_u8s8_saturates", "ort_u8s8_pairs_fit",
           "ORT_INT8_QDQ", "compare_logits", "top1"]

ORT_INT8_QDQ = {"session.qdqisint8allowed": "1"}  # the session config of every check (see ort_session)


def logits_of(fn: Callable[[np.ndarray], np.ndarray], data: ImageSet, mean: list[float], std: list[float],
              batch_size: int = 250, limit: int | None = None, desc: str = "eval") -> np.ndarray:
    """Run fn over the (first `limit` images of the) set in order; fn takes and returns numpy arrays."""
    n = len(data) if limit is None else min(limit, len(data))
    out = []
    with progress(n, desc) as bar:
        for x, _ in batches(data, batch_size, mean, std, limit=n):
            out.append(np.asarray(fn(x.numpy()), dtype=np.float32))
            bar.update(len(x))
    return np.concatenate(out)


def torch_fn(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def ort_session(path: str | Path | bytes, threads: int = 2, int8_qdq: bool = True,
                optimized_path: str | Path | None = None, optimize: bool = True):
    """An onnxruntime CPU session for checking numerics (writing the graph it optimized to `optimized_path`;
    with optimize=False no graph optimization, so no QDQ fusion: every op runs in float on dequantized values).

    int8_qdq sets `session.qdqisint8allowed`: onnxruntime's default on ARM, off on x86. Off, x86 onnxruntime fuses a
    signed-int8 QDQ Conv into its integer kernel only where its S8->U8 rewrite applies (a QuantizeLinear with a single
    DequantizeLinear consumer); a tensor with two consumers (a residual fork) leaves both neighbouring convs as
    DQ -> float Conv -> Q, whose float rounding flips near-ties by one step. On, every QDQ conv runs in integers.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    for key, value in (ORT_INT8_QDQ if int8_qdq else {}).items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


# How onnxruntime's CPU provider runs a conv / matmul after its graph optimizations (QDQ fusion, layout).
_ORT_INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul"}
_ORT_FLOAT_OPS = {"Conv", "FusedConv", "NchwcConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def ort_kernels(path: str | Path, int8_qdq: bool = True) -> dict:
    """Count the convs / matmuls onnxruntime runs in integer kernels and in float ones, read off the graph its
    session optimizes `path` to. A float one computes DQ -> float op -> Q: float accumulation, not the reference's
    exact integers (onnxruntime has no integer kernel for INT4 tensors, for instance)."""
    import tempfile
    from collections import Counter

    import onnx

    with tempfile.TemporaryDirectory() as d:
        ort_session(path, 1, int8_qdq, optimized_path=Path(d) / "optimized.onnx")
        ops = Counter(n.op_type for n in onnx.load(str(Path(d) / "optimized.onnx")).graph.node)
    return {"integer": sum(ops[o] for o in _ORT_INTEGER_OPS), "float": sum(ops[o] for o in _ORT_FLOAT_OPS),
            "ops": {o: ops[o] for o in sorted(_ORT_INTEGER_OPS | _ORT_FLOAT_OPS) if ops[o]}}


def ort_quant_points(model, keys: list[str]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A run of the QDQ `model` (an onnx.ModelProto) in onnxruntime that also returns the integer tensor `<key>.q`
    of each quantization point in `keys`, for comparison with `FakeQuantModel.intermediates`: x -> {tensor name:
    array}, the model's own outputs included."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    # every tensor's type, from shape inference (a QuantizeLinear's follows its zero point; an integer-only op's
    # output is whatever it casts to)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}

    def elem_type(tensor: str) -> int:
        return types.get(tensor, TensorProto.UINT8)

    names = [f"{k}.q" for k in keys]
    m.graph.output.extend([helper.make_tensor_value_info(n, elem_type(n), None) for n in names])
    sess = ort_session(m.SerializeToString())
    outs = [o.name for o in sess.get_outputs()]
    first = sess.get_inputs()[0].name
    return lambda x: dict(zip(outs, sess.run(outs, {first: x}), strict=True))


def ort_u8s8_saturates(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether onnxruntime's U8S8 integer kernels (uint8 activations x int8 weights) may saturate on this CPU:
    on x86-64 without VNNI they add pairs of products in int16 (vpmaddubsw), which overflows once the weights pass
    64 in magnitude (measured on an AVX2 Zen 2: 9% of ResNet-20's W8A8 logits bit-exact, up to 78 steps off).
    With VNNI (vpdpbusd), on ARM, and for int8 activations (S8S8) its kernels are exact."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return True  # unknown x86: assume the common case, no VNNI
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def ort_u8s8_pairs_fit(max_abs_weight: int) -> bool:
    """Whether a pair of uint8 x int8 products with weights up to `max_abs_weight` fits int16, so that the U8S8
    kernels `ort_u8s8_saturates` is about are exact anyway (weights up to 64)."""
    return 2 * 255 * max_abs_weight < 2**15


def ort_fn(sess) -> Callable[[np.ndarray], np.ndarray]:
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels[: len(logits)]).mean())


def compare_logits(device: np.ndarray, reference: np.ndarray, step: float) -> dict:
    """Differences counted in output quantization steps, and top-1 agreement."""
    steps = np.rint(np.abs(device.astype(np.float64) - reference.astype(np.float64)) / step).astype(np.int64)
    return {
        "values": int(steps.size),
        "bit_exact": float((steps == 0).mean()),
        "within_one_step": float((steps <= 1).mean()),
        "max_steps": int(steps.max()) if steps.size else 0,
        "top1_agreement": float((device.argmax(1) == reference.argmax(1)).mean()),
        "step_histogram": {str(k): int(v) for k, v in
                           zip(*np.unique(np.minimum(steps, 10), return_counts=True), strict=False)},
    }
