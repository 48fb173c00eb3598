"""The Relax rewrite that hands integer convs and matmuls to the dot-product kernels of dot_compute.py.

Runs first in the scheduled CPU pipeline (cpu_pipeline.py), with the target's kernel (`CompileTarget.kernel`).
Each integer NHWC conv2d whose input channels pad to a multiple of K and whose output channels are a multiple
of L becomes `fused_conv_te` with a packed constant weight; a matmul with a constant weight becomes
`matmul_te` (token rows as the conv's output pixels); a depthwise conv becomes `dw_te`; a matmul of two
activations (attention) becomes `act_matmul_te` (dot_act_matmul.py):

    conv2d(pad(x, zp), W) -> int32      =>      conv_dot(input_stage(x), Wp) [+ shift * sum W]

The input stage takes in the zero-point Pad before the conv (and the transposes ConvertLayout leaves around
it). `vpdpbusd` multiplies unsigned by signed bytes, so int8 activations are shifted by +128; `sdot` is
signed, so uint8 activations are shifted by -128; AVX2's input stage widens both to int16 (no shift), except
where the weights are in -8..7 and the kernel's small-weights form takes them (AVX2_S4: vpmaddubsw, uint8
activations, +128). The shift is exact: the shift times the weight sum is subtracted again, a per-channel
constant. 4-bit weights (pack_int4.py) are read back from their packed constant and re-packed two per byte in
the kernel's order.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import tvm
from tvm import relax

from ._common import const_np, mutate_relax_functions
from .dot_act_matmul import act_kernel, act_matmul_operands, act_matmul_te
from .dot_compute import ConvInput, dw_te, fused_conv_te, matmul_te, pack_halves, pack_weight
from .dot_instructions import DotKernel, byte_shift
from .pack_int4 import unpacked_value

__all__ = ["rewrite_convs_dot"]


def _matmul(call: relax.Call, kernel: DotKernel, lookup=None) -> tuple[np.ndarray, bool] | None:
    """(the weight as OHWI [N, 1, 1, K], whether it is packed int4) of an integer matmul x [B, (T,) K] @ W [K,
    N] with a constant W the dot kernel takes (N a multiple of L; T and K static), else None."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul" or str(call.ty.dtype) != "int32":
        return None
    x = call.args[0]
    shape = getattr(x.ty, "shape", None)
    shape = None if shape is None else list(shape)
    if str(x.ty.dtype) not in ("int8", "uint8") or shape is None or len(shape) not in (2, 3):
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in shape[1:]) or kernel.pixels > 1:
        return None
    w, int4 = const_np(call.args[1]), False
    if w is None and lookup is not None:
        w, int4 = unpacked_value(call.args[1], lookup), True
    if w is None or w.dtype != np.int8 or w.ndim != 2 or w.shape[0] != int(shape[-1]) \
            or w.shape[1] % kernel.lanes:
        return None
    return np.ascontiguousarray(w.T).reshape(w.shape[1], 1, 1, w.shape[0]), int4


def _depthwise(call: relax.Call, lookup=None) -> np.ndarray | None:
    """The [C, KH, KW, 1] int8 weight of an integer NHWC depthwise conv2d (groups = channels, C a multiple of
    8), else None. 4-bit weights are read back from pack_int4's constant (a few KB: kept as int8)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    layouts = (a.data_layout, a.kernel_layout, a.out_layout)
    if layouts != ("NHWC", "OHWI", "NHWC") or str(a.out_dtype) != "int32":
        return None
    c = call.args[0].ty.shape[3]
    w = const_np(call.args[1])
    if w is None and lookup is not None:
        w = unpacked_value(call.args[1], lookup)
    if not isinstance(c, tvm.tirx.IntImm) or int(a.groups) != int(c) or int(c) % 8 or w is None:
        return None
    if str(call.args[0].ty.dtype) not in ("int8", "uint8") or any(int(d) != 1 for d in a.dilation):
        return None
    return w if w.dtype == np.int8 and w.ndim == 4 and w.shape[0] == int(c) and w.shape[3] == 1 else None


def _eligible(call: relax.Call, kernel: DotKernel, lookup=None) -> tuple[np.ndarray, bool] | None:
    """(the OHWI int8 weight, whether it is stored as packed int4) of an integer NHWC conv2d the dot kernel
    handles, else None. A 4-bit weight of pack_int4 is read back from its packed constant (`lookup`: the
    mutator's lookup_binding)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "OHWI", "NHWC") or int(a.groups) != 1:
        return None
    if str(a.out_dtype) != "int32" or any(int(d) != 1 for d in a.dilation):
        return None
    w, int4 = const_np(call.args[1]), False
    if w is None and lookup is not None:
        w, int4 = unpacked_value(call.args[1], lookup), True
    if str(call.args[0].ty.dtype) not in ("int8", "uint8") or w is None:
        return None
    if w.dtype != np.int8 or w.ndim != 4 or w.shape[0] % kernel.lanes:
        return None
    if kernel.pixels > 1:  # pixel pairs: a static output width, a multiple of the pixels
        ow = call.ty.shape[2] if getattr(call.ty, "shape", None) is not None else None
        if not isinstance(ow, tvm.tirx.IntImm) or int(ow) % kernel.pixels:
            return None
    return w, int4


@relax.expr_functor.mutator
class _DotConvRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, kernel: DotKernel) -> None:
        super().__init__(mod)
        self.kernel = kernel
        self.count = 0

    def _binding(self, expr: relax.Expr, op: str) -> relax.Call | None:
        """The call of `op` bound to the var `expr`, if it is one."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        ok = isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == op
        return bound if ok else None

    def _zero_point_pad(self, data: relax.Expr) -> tuple[relax.Expr, str, tuple[int, ...], int] | None:
        """(source, its layout, (top, bottom, left, right), value) when the conv's NHWC input is a constant
        pad of H and W only: pad(x) in NHWC, or permute(pad(y), NCHW->NHWC), the form ConvertLayout leaves,
        with y an NCHW tensor or permute(x, NHWC->NCHW). None otherwise."""
        layout = "NHWC"
        outer = self._binding(data, "relax.permute_dims")
        if outer is not None:
            if [int(a) for a in outer.attrs.axes] != [0, 2, 3, 1]:
                return None
            layout, data = "NCHW", outer.args[0]
        pad = self._binding(data, "relax.nn.pad")
        if pad is None or str(pad.attrs.pad_mode) != "constant":
            return None
        pw = [int(p) for p in pad.attrs.pad_width]
        hw = (2, 3) if layout == "NCHW" else (1, 2)
        if len(pw) != 8 or any(pw[2 * a] or pw[2 * a + 1] for a in range(4) if a not in hw):
            return None
        src = pad.args[0]
        value = float(pad.attrs.pad_value)
        dtype = str(src.ty.dtype)
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        if value != int(value) or not lo <= value <= hi:
            return None
        inner = self._binding(src, "relax.permute_dims") if layout == "NCHW" else None
        if inner is not None and [int(a) for a in inner.attrs.axes] == [0, 3, 1, 2]:
            layout, src = "NHWC", inner.args[0]
        (ht, hb), (wl, wr) = (pw[2 * hw[0]], pw[2 * hw[0] + 1]), (pw[2 * hw[1]], pw[2 * hw[1] + 1])
        return src, layout, (ht, hb, wl, wr), int(value)

    def _conv_source(self, call: relax.Call) -> tuple[relax.Expr, str, tuple[int, ...], int]:
        """(source, its layout, (top, bottom, left, right) pads, pad value) the conv's input stage reads: the
        conv's own zero padding, or, when it has none, the zero-point Pad before it (_zero_point_pad)."""
        # relax conv2d padding is (top, left, bottom, right)
        t, left, b, r = (int(p) for p in call.attrs.padding)
        pads = (t, b, left, r)
        peeled = None if any(pads) else self._zero_point_pad(call.args[0])
        return peeled if peeled is not None else (call.args[0], "NHWC", pads, 0)

    def _depthwise_call(self, call: relax.Call, w: np.ndarray) -> relax.Expr:
        """The depthwise kernel: its input stage takes in the zero-point pad like the dot kernel's (no shift:
        the bytes are multiplied as they are, widened to int32)."""
        sh, sw = (int(s) for s in call.attrs.strides)
        src, layout, pads, value = self._conv_source(call)
        how = ConvInput(layout, pads, value, int(w.shape[0]), 0, str(src.ty.dtype), 0)
        w_hwc = np.ascontiguousarray(w[..., 0].transpose(1, 2, 0))
        self.count += 1
        return self.builder_.call_te(partial(dw_te, sh=sh, sw=sw, how=how), src, relax.const(w_hwc),
                                     primfunc_name_hint="plateau_dwconv2d")

    def _dot_call(self, te_fn, src: relax.Expr, act_dtype: str, w: np.ndarray, int4: bool, k: DotKernel,
                  name: str, **how: object) -> relax.Expr:
        """Emit the dot kernel `te_fn(src, packed weight, how=ConvInput, int4_shape=...)` for the OHWI int8
        weight `w`, and the per-channel constant that undoes the activation shift (a conv and a matmul
        alike)."""
        shift = byte_shift(act_dtype, k.act_dtype)
        wp, ck = pack_weight(w, k.lanes, k.k, k.groups)
        stage = ConvInput(channels=ck, shift=shift, dtype=k.act_dtype, **how)
        # 4-bit weights stay two per byte, re-packed in the kernel's order and unpacked inside the kernel
        weight = relax.const(pack_halves(wp), "uint8") if int4 else relax.const(wp.astype(k.w_dtype))
        te_call = partial(te_fn, how=stage, int4_shape=tuple(wp.shape) if int4 else None, w_dtype=k.w_dtype)
        out = self.builder_.call_te(te_call, src, weight, primfunc_name_hint=f"{name}_{k.name}")
        self.count += 1
        if not shift:
            return out  # the call itself, not a var bound to it: FuseOps does not fuse across a var alias
        acc = self.builder_.emit(out)
        fix = (-shift * w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1)).astype(np.int32)
        return relax.op.add(acc, relax.const(fix))

    @staticmethod
    def _small(k: DotKernel, w: np.ndarray) -> DotKernel:
        """`k`'s small-weights kernel where the OHWI weight `w` fits it (values in -8..7, whole groups of its K
        input channels), else `k`."""
        s = k.small_weights
        if s is None or w.shape[-1] % s.k or w.shape[0] % s.lanes or w.min() < -8 or w.max() > 7:
            return k
        return s

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        k = self.kernel
        dw = _depthwise(call, self.lookup_binding)
        if dw is not None:
            return self._depthwise_call(call, dw)
        act = act_matmul_operands(call, self.lookup_binding)
        if act is not None:  # attention's Q.K^T / P.V: both operands activations (dot_act_matmul.py)
            a, b, za, zb = act
            ak = act_kernel(k)
            self.count += 1
            return self.builder_.call_te(partial(act_matmul_te, za=za, zb=zb, kernel=ak), a, b,
                                         primfunc_name_hint=f"plateau_act_matmul_{ak.name}")
        # smmla's pixel pairs are two rows one stride apart, which matmul_te's token rows are not: a Linear on an
        # i8mm target runs sdot, like attention's matmuls (every i8mm CPU has dotprod)
        for mk in (k, k.narrow) if k.narrow else (act_kernel(k),):
            mm = _matmul(call, mk, self.lookup_binding)
            if mm is not None:  # the matmul as the dot kernel over token rows (matmul_te)
                x = call.args[0]
                return self._dot_call(matmul_te, x, str(x.ty.dtype), *mm, self._small(mk, mm[0]), "plateau_matmul")
        found = _eligible(call, k, self.lookup_binding)
        if found is None and k.narrow:  # e.g. 8k output channels on VNNI: the 256-bit instruction
            k = k.narrow
            found = _eligible(call, k, self.lookup_binding)
        if found is None:
            return call
        w, int4 = found
        if k.pixels == 1:
            k = self._small(k, w)
        data = call.args[0]
        sh, sw = (int(v) for v in call.attrs.strides)
        # conv padding is zeros (the rewrites pad with the zero point themselves, as a Pad before the conv:
        # taken into the kernel's input stage when the conv adds none of its own)
        src, layout, pads, value = self._conv_source(call)
        pairs = 0
        if k.pixels > 1:  # the re-laid input needs a width that is a multiple of the stride
            width = int(src.ty.shape[3 if layout == "NCHW" else 2]) + pads[2] + pads[3]
            pads = (*pads[:3], pads[3] + (-width % sw))
            pairs = sw
        return self._dot_call(partial(fused_conv_te, sh=sh, sw=sw), src, str(data.ty.dtype), w, int4, k,
                              "plateau_conv2d", layout=layout, pads=pads, value=value, pairs=pairs)


def rewrite_convs_dot(mod: tvm.IRModule, kernel: DotKernel) -> tuple[tvm.IRModule, int]:
    """Replace each eligible integer conv2d / constant-weight matmul by `kernel`'s dot kernel (the target's:
    CompileTarget.kernel); returns (module, how many were replaced)."""
    rw = _DotConvRewriter(mod, kernel)
    out = mutate_relax_functions(rw, mod)
    return relax.transform.DeadCodeElimination()(out), rw.count
