"""compile_onnx: QDQ ONNX file -> integer Relax module -> shared library + manifest for one target.

    >>> m = compile_onnx("runs/r1/export/model_qdq.onnx", "arm64", "runs/r1/compile/arm64")
    >>> m["ops"]["int_conv2d"], m["float_islands"]
    (21, [])

The library holds the weights (imported with keep_params_in_input=False), so loading needs only plain TVM:

    lib = tvm.runtime.load_module("model.so")
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    logits = vm["main"](tvm.runtime.tensor(x_float32_nchw)).numpy()
"""

from __future__ import annotations

import errno
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import onnx as relax_onnx

from plateau.artifacts import atomic_path, sha256_file, write_manifest
from plateau.errors import PlateauError

from ._common import REQUANT_DOC, REQUANT_MODES, const_np
from .cpu_pipeline import SCHEDULES, build_pipeline, scheduled_pipeline
from .dot_instructions import DotKernel
from .dot_schedule import TileChooser
from .exact_division import divide_by_powers_of_two
from .gpu import SOURCE_SUFFIX, device_compiler, device_source, dp4a_count, gpu_pipeline, runtime_available
from .lower import float_compute_calls, float_ops, lower_qdq, op_counts
from .onnx_prep import PreparedModel, array_key, prepare_onnx
from .pack_int4 import pack_int4_weights, packed_weight_bytes
from .rewrite_pad import onnx_constant_pads, restore_pads
from .saturated_cast import drop_cast_wraps
from .targets import CompileTarget, get_target
from .tune import tuned_tiles

__all__ = ["compile_onnx", "build", "import_onnx", "lower_for_target", "graph_layout"]


def import_onnx(onnx_path: str | Path) -> tuple[tvm.IRModule, PreparedModel]:
    """Prepared ONNX -> Relax module with the parameters bound as constants."""
    prep = prepare_onnx(onnx_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic batch and onnx.checker chatter, not user errors
        try:
            mod = relax_onnx.from_onnx(prep.model, keep_params_in_input=False)
        except Exception as e:  # the importer raises bare TVMError / ValueError / KeyError on bad graphs
            raise PlateauError(f"{onnx_path}: the TVM ONNX importer failed: {type(e).__name__}: {e}"
                               ) from None
    return restore_pads(mod, onnx_constant_pads(prep.model)), prep


def _weight_of(call: relax.Call, bindings: dict) -> np.ndarray | None:
    """Follow the weight argument through permute_dims / dequantize to its constant."""
    expr = call.args[1]
    for _ in range(4):
        expr = bindings.get(expr, expr)
        a = const_np(expr)
        if a is not None:
            return a
        if not isinstance(expr, relax.Call):
            return None
        expr = expr.args[0]
    return None


# Relax op -> the ONNX op types it comes from, to name the node behind a float island (by order of
# appearance).
_ONNX_TYPES = {
    "nn.softmax": ("Softmax",), "nn.log_softmax": ("LogSoftmax",), "nn.layer_norm": ("LayerNormalization",),
    "nn.gelu": ("Gelu",), "nn.gelu_tanh": ("Gelu",), "sigmoid": ("Sigmoid", "HardSigmoid"), "tanh": ("Tanh",),
    "mean": ("GlobalAveragePool", "ReduceMean"), "nn.avg_pool2d": ("AveragePool",),
    "nn.max_pool2d": ("MaxPool",),
    "add": ("Add", "Sum"), "multiply": ("Mul",), "subtract": ("Sub",), "divide": ("Div",),
    "concat": ("Concat",),
    "reshape": ("Reshape", "Flatten"), "permute_dims": ("Transpose",), "strided_slice": ("Slice",),
    "nn.pad": ("Pad",), "nn.relu": ("Relu",), "clip": ("Clip",), "erf": ("Erf",),
}


# Float ops kept without allow_float: a transformer's LayerNorm, Softmax and GELU, which plateau export writes
# as float islands by default (plateau/ops/float_island.py, `default=True`). Anything else left in float (Sin,
# GlobalLpPool's power and sum, a pooling whose size is unknown) needs allow_float, as --help says.
DEFAULT_FLOAT_OPS = ("nn.softmax", "nn.layer_norm", "nn.gelu", "nn.gelu_tanh")
# ONNX ops the integer path handles (or that carry no arithmetic): a node of another type is what a float op
# that matches no ONNX type by name came from.
_LOWERED_ONNX = {
    "QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "Add", "Sum", "Mul", "Sub", "Concat",
    "Reshape", "Flatten", "Transpose", "Pad", "Slice", "Cast", "Constant", "Identity", "Squeeze", "Unsqueeze",
    "Softmax", "LayerNormalization", "Gelu", "Shape", "Gather",
}


def _float_islands(mod: tvm.IRModule, prep: PreparedModel) -> list[dict]:
    """Every op left computing in float, in order: conv2d / matmul ("compute": an error unless allow_float,
    named by the ONNX node owning the weight) and other ops on dequantized values ("float_op": Softmax,
    LayerNorm, GELU kept between a dequantize and a quantize, or a pattern that could not be lowered)."""
    bindings = {
        b.var: b.value
        for f in mod.functions.values() if isinstance(f, relax.Function)
        for blk in f.body.blocks for b in blk.bindings
    }
    islands = []
    compute = float_compute_calls(mod)
    for i, (kind, call) in enumerate(compute):
        w = _weight_of(call, bindings)
        node, op_type = prep.weight_owner.get(array_key(w), (f"{kind}#{i}", "?")) if w is not None else (
            f"{kind}#{i}", "?")
        islands.append({"node": node, "op_type": op_type, "relax_op": kind, "kind": "compute"})
    compute_calls = [c for _, c in compute]
    others = [(n, c) for n, c in float_ops(mod) if not any(c.same_as(x) for x in compute_calls)]
    remaining = Counter(n for n, _ in others)
    seen: dict[str, int] = {}
    unnamed = []  # indices of ops matched to no ONNX node
    for name, _call in others:
        nodes = [n for n in prep.model.graph.node if n.op_type in _ONNX_TYPES.get(name, ())]
        k = seen.get(name, 0)
        seen[name] = k + 1
        if not nodes:  # an op the table does not know: an ONNX node of the same name (Sin is relax "sin")
            nodes = [n for n in prep.model.graph.node if n.op_type.lower() == name.rsplit(".", 1)[-1]]
        # The k-th remaining op is the k-th ONNX node only when none of that type was lowered.
        if len(nodes) == remaining[name]:
            node, op_type = nodes[k].name or nodes[k].output[0], nodes[k].op_type
        else:
            node, op_type = f"{name}#{k}", "/".join(_ONNX_TYPES.get(name, ("?",)))
            unnamed.append(len(islands))
        islands.append({"node": node, "op_type": op_type, "relax_op": name, "kind": "float_op"})
    return _merge_decomposed(islands, unnamed, prep)


def _merge_decomposed(islands: list[dict], unnamed: list[int], prep: PreparedModel) -> list[dict]:
    """The importer decomposes some ONNX ops (HardSwish -> add, clip, divide, multiply; GlobalLpPool -> abs,
    power, sum): when the graph has exactly one node with no integer lowering, those unmatched ops are that node,
    listed once under its name."""
    suspects = [n for n in prep.model.graph.node if n.op_type not in _LOWERED_ONNX]
    if not unnamed or len(suspects) != 1:
        return islands
    node = suspects[0]
    merged = {"node": node.name or node.output[0], "op_type": node.op_type,
              "relax_op": ", ".join(dict.fromkeys(islands[i]["relax_op"] for i in unnamed)), "kind": "float_op"}
    drop = set(unnamed[1:])
    return [merged if i == unnamed[0] else isl for i, isl in enumerate(islands) if i not in drop]


def _check_input_shape(prep: PreparedModel, onnx_path: Path) -> None:
    """Only the batch may be symbolic: with the image size unknown, pooling has no integer form (its divisor is
    unknown) and would silently stay in float, and no kernel can be scheduled for it."""
    weights = {x.name for x in prep.model.graph.initializer}
    for inp in prep.model.graph.input:
        if inp.name in weights:
            continue
        dims = inp.type.tensor_type.shape.dim
        shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        symbolic = [i for i, d in enumerate(dims) if i > 0 and not d.HasField("dim_value")]
        if symbolic:
            raise PlateauError(
                f"{onnx_path}: input {inp.name!r} has shape {shown}: dimension(s) {symbolic} are symbolic, and only "
                "the batch (dimension 0) may be; export the model with a fixed image size (e.g. set the dims "
                "with onnx.tools.update_model_dims)")


def _suspects(prep: PreparedModel) -> list[str]:
    """The ONNX nodes with no integer lowering, for naming float ops that match no node by type."""
    return [f"{n.name or n.output[0]!r} ({n.op_type})" for n in prep.model.graph.node
            if n.op_type not in _LOWERED_ONNX]


def _op_names(mod: tvm.IRModule):
    for f in mod.functions.values():
        if isinstance(f, relax.Function):
            for blk in f.body.blocks:
                for b in blk.bindings:
                    if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name"):
                        yield b.value.op.name


def graph_layout(target: CompileTarget, schedule: str = "default") -> str:
    """The conv layout of the graph: NHWC where the target's dot kernel runs (its reduction over contiguous
    channels), else the target's own."""
    if schedule == "default" and target.kernel is not None:
        return "NHWC"
    return target.conv_layout


def _to_layout(mod: tvm.IRModule, layout: str) -> tvm.IRModule:
    """Switch integer conv2d to `layout`; the weight transposes are folded into the constants."""
    if layout == "NCHW" or not any(name == "relax.nn.conv2d" for name in _op_names(mod)):
        return mod  # nothing to convert (ConvertLayout also fails on some conv-free graphs, e.g. 4-D Max)
    assert layout == "NHWC", layout
    try:
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
    except RuntimeError as e:  # tvm.error.InternalError
        if "Layout" not in str(e):
            raise
        # TVM's layout inference fails on some integer chains downstream of a conv (an integer-only ViT: the
        # patch embedding feeds integer LayerNorms): switch each conv alone, with a transpose on either side
        mod = _nhwc_conv_alone(mod)
    return relax.transform.FoldConstant()(mod)


def _nhwc_conv_alone(mod: tvm.IRModule) -> tvm.IRModule:
    """conv2d(x, w) in NCHW / OIHW => permute(conv2d_nhwc(permute(x), permute(w)), back to NCHW)."""

    @relax.expr_functor.mutator
    class Switch(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"
                    and call.attrs.data_layout == "NCHW" and call.attrs.kernel_layout == "OIHW"):
                return call
            a = call.attrs
            x = self.builder_.emit(relax.op.permute_dims(call.args[0], [0, 2, 3, 1]))
            w = self.builder_.emit(relax.op.permute_dims(call.args[1], [0, 2, 3, 1]))
            y = self.builder_.emit(relax.op.nn.conv2d(
                x, w, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                data_layout="NHWC", kernel_layout="OHWI", out_dtype=a.out_dtype))
            return relax.op.permute_dims(y, [0, 3, 1, 2])

    out = tvm.IRModule(mod.functions)
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            out[gv] = Switch().visit_expr(f)
    return out


def lower_for_target(mod: tvm.IRModule, target: CompileTarget, schedule: str = "default") -> tvm.IRModule:
    """The target-specific steps after lower_qdq: conv layout, constant folding, the importer's float -> integer
    Cast wraps dropped where the value is clamped into the type (saturated_cast.py), divisions by a constant power
    of two as multiplies (exact_division.py), 4-bit weight packing."""
    mod = _to_layout(mod, graph_layout(target, schedule))
    mod = divide_by_powers_of_two(drop_cast_wraps(relax.transform.FoldConstant()(mod)))
    return pack_int4_weights(relax.transform.DeadCodeElimination()(mod))


def build(mod: tvm.IRModule, target: CompileTarget, schedule: str = "default",
          tiles: TileChooser | None = None) -> tuple[relax.VMExecutable, dict]:
    """Build `mod` for `target`, trying its fallback target dicts if the main one fails; returns (executable,
    the target dict used).

    The pipeline is TVM's default CPU pipeline without FoldConstant (see pack_int4): fold before calling this.
    On CPUs, schedule "default" adds the target's dot kernel and the hand schedules (cpu_pipeline.py; `tiles`:
    tuned conv tiles, tune.py); "none" builds the kernels unscheduled. The fallback dicts build without a dot
    kernel (_kernel_in_use).
    """
    if schedule not in SCHEDULES:
        raise PlateauError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    errors = []
    for tdict in (target.tvm_target, *target.fallbacks):
        try:
            t = tvm.target.Target(tdict)
            if target.device != "cpu":
                pipeline = gpu_pipeline(t)
            elif schedule == "default":
                pipeline = scheduled_pipeline(t, _kernel_in_use(target, tdict, schedule), tiles)
            else:
                pipeline = build_pipeline(t)
            with device_compiler(t.kind.name):
                return tvm.compile(mod, t, relax_pipeline=pipeline), tdict
        except Exception as e:  # LLVM rejects a CPU name or a schedule: the next; all reported if none builds
            errors.append(f"{tdict}: {type(e).__name__}: {_first_error_line(str(e))}")
    raise PlateauError(f"target {target.name!r} failed to build: " + " | ".join(errors))


def _kernel_in_use(target: CompileTarget, tdict: dict, schedule: str) -> DotKernel | None:
    """The dot kernel a build of `target` with the target dict `tdict` runs: the target's own for its main
    dict and the default schedule; none for a fallback dict (a generic CPU) or unscheduled builds."""
    return target.kernel if schedule == "default" and tdict == target.tvm_target else None


def _first_error_line(msg: str) -> str:
    """The line of a build failure that says what went wrong: a device compiler's log (NVRTC, nvcc) starts
    with a bare "compilation failed:" and names the error further down."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return ""
    if lines[0].endswith(":"):
        detail = next((ln for ln in lines[1:] if "error" in ln.lower()), lines[1] if len(lines) > 1 else "")
        return " ".join([lines[0], detail]).strip()
    return lines[0]


def _io_info(mod: tvm.IRModule) -> tuple[dict, dict]:
    main = mod["main"]
    dims = lambda shape: [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in shape]  # noqa: E731
    p = main.params[0]
    inp = {"shape": dims(p.ty.shape), "dtype": str(p.ty.dtype)}
    ret = main.ret_type if hasattr(main, "ret_type") else main.body.ty
    out = {"shape": dims(ret.shape), "dtype": str(ret.dtype)}
    return inp, out


def compile_onnx(
    onnx_path: str | Path,
    target: str,
    out_dir: str | Path,
    *,
    allow_float: bool = False,
    requant: str = "float",
    schedule: str = "default",
    tune_minutes: float = 0.0,
    tune_rpc: str | None = None,
    tune_rpc_key: str = "",
) -> dict:
    """Compile the QDQ ONNX model at `onnx_path` for `target`; write out_dir/model.so and manifest.json.

    Every quantized conv2d / matmul is lowered to int8 x int8 -> int32 (see lower_qdq). One that cannot be
    lowered is a PlateauError naming its ONNX node, unless `allow_float`, which keeps it in float and lists it
    in manifest["float_islands"]. `requant` is "float" (float32 multiplier, as onnxruntime's
    fused kernels), "float64" (the exact product) or "fixed" (integer-only); see plateau.compile._common.
    `schedule` "default" uses the target's dot kernel and the hand-written CPU schedules (cpu_pipeline.py),
    "none" TVM's unscheduled kernels; manifest["kernel"] names the dot kernel in use (None: none).
    `tune_minutes` > 0 searches conv tiles within that budget (tune.py), timed on this machine, or on the
    board at `tune_rpc` (HOST:PORT of `plateau device serve`; needed for arm64 targets), kept in
    out_dir/tuning/ so later builds reuse them. Returns the manifest dict.
    """
    tgt = get_target(target)
    if requant not in REQUANT_MODES:
        raise PlateauError(f"unknown requant mode {requant!r}; valid: {', '.join(REQUANT_MODES)}")
    tgt.check_toolchain()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)

    mod, prep = import_onnx(onnx_path)
    n_inputs = len(mod["main"].params)
    if n_inputs != 1:
        raise PlateauError(f"{onnx_path}: expected one graph input (the image batch), found {n_inputs}")
    _check_input_shape(prep, onnx_path)
    mod = lower_qdq(mod, requant=requant)
    islands = _float_islands(mod, prep)  # before layout conversion, which folds dequantized float weights
    blocking = [i for i in islands if i["kind"] == "compute"]
    if blocking and not allow_float:
        names = ", ".join(f"{i['node']!r} ({i['op_type']})" for i in blocking)
        raise PlateauError(
            f"{onnx_path}: cannot lower to integer arithmetic: {names}. Quantize these layers with symmetric "
            "int8/int4 weights (per-tensor or per-output-channel) followed by QuantizeLinear, or pass "
            "--allow-float (allow_float=True) to keep them in float"
        )
    floats = [i for i in islands if i["kind"] == "float_op" and i["relax_op"] not in DEFAULT_FLOAT_OPS]
    if floats and not allow_float:
        named = [f"{i['node']!r} ({i['op_type']})" for i in floats if i["op_type"] != "?"]
        unnamed = list(dict.fromkeys(i["relax_op"] for i in floats if i["op_type"] == "?"))
        if unnamed:  # a node TVM decomposed (GlobalLpPool -> abs, power, sum): name the ONNX nodes it can be
            named.append(f"{', '.join(_suspects(prep)) or 'a node'} (computed as {', '.join(unnamed)})")
        raise PlateauError(
            f"{onnx_path}: no integer form for {', '.join(dict.fromkeys(named))}: these would compute in float "
            "between a DequantizeLinear and a QuantizeLinear; pass --allow-float (allow_float=True) to keep them "
            "so (listed in the manifest), or quantize the model without them"
        )

    mod = lower_for_target(mod, tgt, schedule)
    lib_weight_bytes, n_packed = packed_weight_bytes(mod)
    tiles, tuning = None, None
    if tune_minutes < 0 or tune_minutes != tune_minutes:
        raise PlateauError(f"--tune-minutes must be >= 0, got {tune_minutes}")
    if schedule == "default":  # the database in out_dir/tuning/, searched when tune_minutes > 0
        tiles, tuning = tuned_tiles(mod, tgt, out_dir / "tuning", tune_minutes, tune_rpc, tune_rpc_key)
        if tuning:  # relative to the compile folder, which a stage writes under a staging name first
            tuning["database"] = f"tuning/{Path(tuning['database']).name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_room(out_dir, 2 * prep.weight_bytes + (8 << 20))
    ex, tdict = build(mod, tgt, schedule, tiles)
    so = out_dir / "model.so"
    with atomic_path(so) as tmp:
        tmp_so = tmp.with_suffix(".so")  # export_library picks the output format from the suffix
        try:
            tgt.export_library(ex, tmp_so)
            tmp_so.replace(tmp)
        finally:
            tmp_so.unlink(missing_ok=True)

    extra: dict = {}
    if tgt.device != "cpu":
        # GPU: keep the generated kernels next to the library; say whether this machine could run them.
        src = out_dir / f"model{SOURCE_SUFFIX[tgt.device]}"
        with atomic_path(src) as tmp:
            tmp.write_text(device_source(ex))
        extra["device_source"] = {"path": src.name, "sha256": sha256_file(src), "kernels": _kernel_count(src)}
        if tgt.device == "cuda":
            extra["device_source"]["dp4a"] = dp4a_count(src.read_text())
        extra["runs_here"] = runtime_available(tgt.device)
        needs = ("a CUDA driver and GPU" if tgt.device == "cuda" else
                 "an OpenCL device and a TVM runtime built with USE_OPENCL=ON (the apache-tvm wheel "
                 "has no OpenCL runtime)")
        extra["run_note"] = "run where a GPU exists: " + needs

    inp, out = _io_info(mod)
    out["name"] = next((o.name for o in prep.model.graph.output), "output")
    weights = {x.name for x in prep.model.graph.initializer}
    inp["name"] = next(i.name for i in prep.model.graph.input if i.name not in weights)
    config = {"target": target, "allow_float": allow_float, "requant": requant, "schedule": schedule}
    kernel = _kernel_in_use(tgt, tdict, schedule)
    return write_manifest(
        out_dir, "compile", config=config,
        outputs={"library": {"path": so.name, "sha256": sha256_file(so), "bytes": so.stat().st_size}},
        inputs={"onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)}},
        target=target, tvm_target=tdict, arch=tgt.arch, tvm_version=tvm.__version__,
        input=inp, output=out, batch="dynamic" if isinstance(inp["shape"][0], str) else inp["shape"][0],
        conv_layout=graph_layout(tgt, schedule), kernel=kernel.name if kernel else None, ops=op_counts(mod),
        float_islands=islands, tuning=tuning,
        requantize={"mode": requant, **REQUANT_DOC[requant]},
        weight_bytes=prep.weight_bytes, weight_bits=sorted(prep.compute_weight_bits),
        # weights whose values fit in 4 bits are stored two per byte and unpacked at run time (pack_int4.py)
        library_weight_bytes=lib_weight_bytes, packed_int4_weights=n_packed, **extra,
    )


def _check_room(out_dir: Path, need: int) -> None:
    """LLVM aborts the whole process when it cannot write an object file (no exception to catch): refuse first
    when the file-size limit or the free space of the output or temporary folder is below what a build writes
    (`need`: the weights twice, the code, a margin). An OSError, which the stage reports naming the folder."""
    import resource
    import shutil
    import tempfile

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raise OSError(errno.EFBIG, f"File too large: the file size limit (ulimit -f) is {soft // 1024} kB, below the "
                      f"{need >> 20} MB a build may write", str(out_dir))
    for folder in (out_dir, Path(tempfile.gettempdir())):
        free = shutil.disk_usage(folder).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: {free >> 10} kB free, a build may write "
                          f"{need >> 20} MB", str(folder))


def _kernel_count(src: Path) -> int:
    """Kernel definitions in CUDA / OpenCL source (CUDA sources also declare each kernel first)."""
    return len(re.findall(r"(?:__global__|__kernel) void[^;{]*\{", src.read_text()))
