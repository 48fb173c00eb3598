"""reference.pt: everything that rebuilds the fake-quant reference, as tensors and plain values (it loads with
torch.load(weights_only=True): no pickled objects).

    >>> torch.save(reference_state(ref, model), "reference.pt")
    >>> ref = load_reference("reference.pt")
"""

from __future__ import annotations

from pathlib import Path

import torch

from plateau.capture import capture
from plateau.errors import PlateauError
from plateau.models import model_cfg, read_torch_file, rebuild_model
from plateau.ops.island_forms import integer_forms
from plateau.qconfig import QuantConfig
from plateau.qgraph import ActQ, QGraph, WeightQ
from plateau.quant import QType
from plateau.reference import FakeQuantModel

from .onnx_reader import read_onnx

__all__ = ["reference_state", "load_reference"]


def reference_state(ref: FakeQuantModel, model: torch.nn.Module | QGraph, source: dict | None = None) -> dict:
    """Everything needed to rebuild the reference, as tensors and plain values (loads with weights_only=True)."""
    from_onnx = isinstance(model, QGraph)
    return {
        "format": "plateau.reference", "version": 1,
        "model_name": None if from_onnx else getattr(model, "plateau_name", None),
        "onnx_path": (source or {}).get("onnx") if from_onnx else None,
        "num_classes": int(ref.graph.weighted()[-1].weight.shape[0]),
        "plateau_cfg": ref.model_cfg if from_onnx else model_cfg(model),
        "model": {} if from_onnx else model.state_dict(),
        "config": ref.cfg.to_dict(),
        "acts": {k: {"scale": a.scale, "zero_point": a.zero_point, **a.qtype.to_dict()} for k, a in ref.acts.items()},
        "weights": {k: {"q": w.q.to(torch.int8 if w.qtype.bits <= 8 else torch.int32), "scale": w.scale,
                        "bias_q": w.bias_q.to(torch.int32), "bias_scale": w.bias_scale, **w.qtype.to_dict()}
                    for k, w in ref.weights.items()},
    }


def load_reference(path: str | Path) -> FakeQuantModel:
    """Rebuild the fake-quant reference saved by `plateau export` (reference.pt)."""
    path = Path(path)
    st = read_torch_file(path, "reference", " (run `plateau export` first)")
    if not isinstance(st, dict) or st.get("format") != "plateau.reference":
        raise PlateauError(f"reference {path}: not a Plateau reference file")
    if st.get("onnx_path"):
        graph = read_onnx(st["onnx_path"], allow_float=st["config"].get("allow_float", False))
    else:
        model = rebuild_model(st["model_name"], st["num_classes"], st["plateau_cfg"])
        model.load_state_dict(st["model"], strict=False)
        graph = capture(model.eval(), [1, *st["plateau_cfg"]["input_size"]], st["config"].get("allow_float", False))
    # a reference file from before exact islands kept its islands in float
    cfg = QuantConfig.from_dict({"exact_islands": False, **st["config"]})
    integer_forms(graph, cfg)
    acts = {k: ActQ(a["scale"], a["zero_point"], QType(a["bits"], a["signed"], a["narrow"]))
            for k, a in st["acts"].items()}
    weights = {k: WeightQ(w["q"].float(), w["scale"], QType(w["bits"], w["signed"], w["narrow"]),
                          w["bias_q"].long(), w["bias_scale"]) for k, w in st["weights"].items()}
    return FakeQuantModel(graph, acts, weights, cfg, st["plateau_cfg"])
