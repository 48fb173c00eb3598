"""The export report in Markdown (report.json holds the same figures)."""

from __future__ import annotations

from collections import Counter

__all__ = ["render_report"]

_FORMS = {"lut": "exact lookup table", "int_softmax": "integer Softmax", "int_layernorm": "integer LayerNorm",
          "exact_softmax": "float64 from exact integer sums", "exact_layernorm": "float64 from exact integer sums"}


def render_report(r: dict) -> str:
    t = r["top1"]
    lines = [f"# Export report: {r['model']} at {r['bits']}", "",
             f"Data: `{r['data']}`, {r['test_images']} test images. Output step: {r['output_step']:.6g}.", "",
             "| model | top-1 |", "|---|---|"]
    for k, v in t.items():
        lines.append(f"| {k} | {100 * v:.2f}% |")
    c = r.get("onnxruntime_vs_reference")
    if c:
        lines += ["", "onnxruntime QDQ against the fake-quant reference:", "",
                  f"- top-1 agreement: {100 * c['top1_agreement']:.2f}%",
                  f"- logits bit-exact: {100 * c['bit_exact']:.3f}%, within one step: "
                  f"{100 * c['within_one_step']:.3f}%, max difference: {c['max_steps']} steps"]
        k = r.get("onnxruntime_kernels")
        if k:
            ops = ", ".join(f"{n} {v}" for n, v in k["ops"].items())
            lines.append(f"- onnxruntime's kernels: {k['integer']} integer, {k['float']} float ({ops})")
            if k["float"]:
                lines.append("  A float kernel computes DequantizeLinear -> float op -> QuantizeLinear: its float "
                             "accumulation can round a near-tie the other way from the reference's exact integers.")
            if k["float"] and r.get("four_bit_layout") == "native":
                lines.append("  onnxruntime has no integer kernel for INT4 tensors; `--four-bit-layout widened` "
                             "writes the same graph in a form it runs in integers.")
    m = r.get("mixed_precision")
    if m:
        widths = Counter(m["layer_bits"].values())
        lines += ["", f"Mixed precision: weights stored in {m['avg_stored_bits']:.3f} bits each on average (budget "
                  f"{m['budget_avg_bits']:g}; {m['avg_weight_bits']:.3f} bits of precision), from "
                  f"{m['sensitivity_measure']} sensitivity on "
                  f"{m['sensitivity_images']} calibration images ({m['sensitivity_seconds']:.0f} s); layers per "
                  "width: " + ", ".join(f"{b}-bit {widths[b]}" for b in sorted(widths, reverse=True))]
        if m.get("pinned"):
            lines.append("  Kept at the width asked for: " + ", ".join(f"{k} {b}-bit" for k, b in m["pinned"].items()))
    if "onnxruntime_note" in r:
        lines += ["", f"Note: {r['onnxruntime_note']}."]
    if "onnxruntime_error" in r:
        lines += ["", f"onnxruntime: {r['onnxruntime_error']}"]
    islands = r.get("float_islands") or []
    lines += ["", f"Float islands: {len(islands)}" + ("" if islands else ", every op is integer")]
    lines += [f"- `{i['node']}` ({i['kind']}{', module ' + i['module'] if i.get('module') else ''})" for i in islands]
    forms = Counter(f"{i['kind']} as {_FORMS.get(i['form'], i['form'])}" for i in r.get("integer_islands") or [])
    if forms:
        lines += ["", "Computed from their integers, the same on every engine: " +
                  ", ".join(f"{n} {k}" for k, n in forms.items())]
    return "\n".join(lines) + "\n"
