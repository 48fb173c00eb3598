"""Where onnxruntime first leaves the fake-quant reference, layer by layer, for an export's QDQ file.

    .venv/bin/python bench/ort_layers.py runs/bench-ptq/W8A8 [--images 10000] [--data ../shared/data/cifar10]

Every quantization point's integer tensor (`<node>.q`) becomes an extra output of a copy of model_qdq.onnx; onnxruntime
(the session every Plateau check uses) runs it on the test images in order, and each tensor is compared with
`FakeQuantModel.intermediates` of the export's reference. Prints, in graph order, how many values differ at each
point; the first one with a difference is where onnxruntime's arithmetic parts from the reference, the rest follows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="a run folder with export/model_qdq.onnx and export/reference.pt")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    a = p.parse_args()
    from plateau.data import batches, load_split
    from plateau.export import load_reference
    from plateau.export.validate import ort_quant_points

    export = Path(a.run) / "export"
    ref = load_reference(export / "reference.pt")
    run = ort_quant_points(onnx.load(str(export / "model_qdq.onnx")), list(ref.acts))
    differ = dict.fromkeys(ref.acts, 0)
    total = dict.fromkeys(ref.acts, 0)
    test = load_split(a.data, "test")
    for x, _ in batches(test, 200, ref.model_cfg["mean"], ref.model_cfg["std"], limit=a.images):
        got = run(x.numpy())
        want = ref.intermediates(x)
        for k in ref.acts:
            d = got[f"{k}.q"].astype(np.int64) - want[k].numpy().astype(np.int64).reshape(got[f"{k}.q"].shape)
            differ[k] += int((d != 0).sum())
            total[k] += d.size
    first = next((k for k in ref.acts if differ[k]), None)
    rows = [{"point": k, "op": ref.graph.node(k).op, "differ": differ[k], "values": total[k]} for k in ref.acts]
    print(json.dumps({"run": a.run, "images": min(a.images, len(test)), "first_differing": first,
                      "first_op": ref.graph.node(first).op if first else None,
                      "points": [r for r in rows if r["differ"]]}, indent=1))


if __name__ == "__main__":
    main()
