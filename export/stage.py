"""`plateau export`: a trained model -> fake-quant reference + QDQ ONNX, validated on onnxruntime.

Reads <run>/train/manifest.json (or --checkpoint with --model), writes <run>/export/:
    model_qdq.onnx, model_fp32.onnx      the quantized graph and the BN-folded float graph
    reference.pt                          what rebuilds the reference (weights_only-loadable)
    reference_logits.npy, labels.npy      reference logits on the test split, for later stages
    report.json, report.md, manifest.json
The folder is replaced as a whole (plateau.staging): a failed or killed export leaves the previous one as it was.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import torch

from plateau.artifacts import (
    atomic_path,
    read_manifest,
    save_npy,
    save_torch,
    sha256_file,
    verify_file,
    write_json,
    write_manifest,
    write_text,
)
from plateau.capture import capture
from plateau.config_cli import config_from_args, config_options, float_at_least, int_at_least, option_name
from plateau.data import SYNTHETIC, batches, check_classes, check_image_size, load_splits
from plateau.errors import PlateauError
from plateau.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_model,
    load_state_dict_file,
    model_cfg,
    parse_model_kwargs,
    read_torch_file,
    rebuild_model,
)
from plateau.ops.island_forms import ISLAND_FORMS
from plateau.qconfig import QuantConfig
from plateau.qgraph import QGraph
from plateau.quant import parse_bits
from plateau.reference import FakeQuantModel
from plateau.staging import staged_output
from plateau.train.qat import QAT_FORMAT, QATNet

from .onnx_reader import read_onnx
from .onnx_writer import FOUR_BIT_LAYOUTS, to_float_onnx, to_qdq_onnx
from .presets import PRESET_FIELDS, ptq_defaults
from .ptq import quantize_graph, quantize_model
from .reference_file import load_reference, reference_state
from .report import render_report
from .sensitivity import SENSITIVITIES, mixed_precision
from .validate import (
    ORT_INT8_QDQ,
    compare_logits,
    logits_of,
    ort_fn,
    ort_kernels,
    ort_session,
    ort_u8s8_pairs_fit,
    ort_u8s8_saturates,
    top1,
    torch_fn,
)

__all__ = ["add_arguments", "main", "export_model", "load_reference", "resolve_source"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="start from this checkpoint instead of the run's training output")
    p.add_argument("--model", help="model name for --checkpoint (default: the name stored in the checkpoint)")
    p.add_argument("--onnx", help="quantize this FP32 ONNX file (from any tool) instead of a checkpoint; "
                                  "needs --data")
    p.add_argument("--mean", type=float, nargs=3, help="input normalization mean for --onnx (default ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="input normalization std for --onnx (default ImageNet's)")
    p.add_argument("--data", help="ImageFolder tree or 'synthetic' (default: the data the run trained on)")
    p.add_argument("--bits", help="W8A8 (default), W4A8, W4A4, ... (2..8 bits each); a QAT run's own bits")
    p.add_argument("--qat", action="store_true", help="the checkpoint must be a QAT one (`plateau train --qat`): its "
                   "learned weights and scales are written as they are, no calibration")
    config_options(p, QuantConfig)  # calibration, rounding, first/last 8-bit, ... (plateau/qconfig.py)
    # Left open, the methods come from the bit width (presets.py): the best measured, or --fast.
    p.set_defaults(**{k: None for k in PRESET_FIELDS})
    p.add_argument("--no-learn-act-clip", dest="learn_act_clip", action="store_false",
                   help="no learned activation clipping (the default below 8-bit weights with 8-bit activations)")
    p.add_argument("--fast", action="store_true", help="round to nearest, no learned rounding: seconds, not "
                   "minutes (default below 8 bits: learned rounding per block, see export/presets.py)")
    p.add_argument("--mixed-precision", type=float_at_least(4.0, 8.0), metavar="AVG_BITS",
                   help="keep the layers whose weights matter most at 8 bits and the rest at --bits' width (4 "
                        "if wider), so that the stored weights average at most AVG_BITS per weight (4..8, e.g. 5: "
                        "int4 holds 4-bit and narrower weights); measured per layer, chosen greedily, recorded in "
                        "the manifest and the report")
    p.add_argument("--sensitivity", choices=SENSITIVITIES.names(),
                   help="--mixed-precision's per-layer measure: 'kl' (default: the output KL measured with one "
                        "forward per layer and width, e.g. ~13 s on ResNet-20) or 'fisher' (its second-order "
                        "estimate from one backward pass per image: faster on large models, a coarser choice)")
    p.add_argument("--sensitivity-images", type=int_at_least(1), metavar="N",
                   help="calibration images --mixed-precision measures sensitivity on (default 256)")
    p.add_argument("--four-bit-layout", default="widened", choices=FOUR_BIT_LAYOUTS,
                   help="how weights and activations below 8 bits are written: 'widened' (INT4 weights read through "
                        "Cast(INT8), activations clamped in INT8: onnxruntime runs them in its integer kernels) or "
                        "'native' (INT4 straight into DequantizeLinear / out of QuantizeLinear: onnxruntime runs those "
                        "convs in float)")
    p.add_argument("--eval-limit", type=int_at_least(1), help="validate on the first N test images (default: all)")
    p.add_argument("--img-size", type=int_at_least(8),
                   help="the model's input size (a timm ViT is built for it); ImageFolder images are resized to it")
    p.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="keyword arguments of the model's constructor for --checkpoint (timm's, e.g. "
                        "depth=6,global_pool=avg,class_token=false), recorded in the manifest")


def resolve_source(run: Path, checkpoint: str | None, model_name: str | None, img_size: int | None = None,
                   model_kwargs: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """The FP model to quantize and what is known about it (checkpoint, data, classes). A Plateau checkpoint
    rebuilds its model with the keyword arguments it records; a bare state dict with `img_size` and
    `model_kwargs` (e.g. a timm ViT at 32x32)."""
    if checkpoint is None:
        train_dir = run / "train"
        if not (train_dir / "manifest.json").exists() and (train_dir / "last.pt").is_file():
            raise PlateauError(f"{train_dir}: training did not finish (last.pt but no manifest.json): continue it "
                               f"with `plateau train --run {run} --resume`, or export it with --checkpoint "
                               f"{train_dir / 'last.pt'} --model NAME")
        man = read_manifest(train_dir, "train")
        name = man["outputs"].get("checkpoint", "last.pt")
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise PlateauError(f"{train_dir / 'manifest.json'}: outputs.checkpoint {name!r} is not a file name; "
                               "run `plateau train` again")
        # a resumed run killed before its manifest: last.pt is newer than what the manifest vouches for
        ckpt = verify_file(train_dir, man, name, "train", fix=f"finish the run with `plateau train --run {run} "
                                                               "--resume`")
        data = man["config"].get("data")
        info = {"checkpoint": str(ckpt), "data": data if isinstance(data, str) else None,
                "model": man.get("model_name")}
    else:
        ckpt = Path(checkpoint)
        info = {"checkpoint": str(ckpt), "data": None, "model": model_name}
    blob = read_torch_file(ckpt)
    if isinstance(blob, dict) and "qat" in blob:
        return _qat_source(ckpt, blob, info)
    name = model_name or (blob.get("model_name") if isinstance(blob, dict) else None) or info["model"]
    if not name:
        raise PlateauError(f"checkpoint {ckpt} does not name its model: pass --model NAME")
    num_classes = blob.get("num_classes", 10) if isinstance(blob, dict) else 10
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise PlateauError(f"checkpoint {ckpt}: num_classes {num_classes!r} is not a positive integer")
    recorded = blob.get("plateau_cfg") if isinstance(blob, dict) else None
    if isinstance(recorded, dict) and not (img_size or model_kwargs):
        model = rebuild_model(name, num_classes, recorded)
    else:
        model = create_model(name, num_classes=num_classes, img_size=img_size, **(model_kwargs or {}))
    load_state_dict_file(model, ckpt)
    classes = blob.get("classes") if isinstance(blob, dict) else None
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise PlateauError(f"checkpoint {ckpt}: 'classes' is not a list of names")
    info.update(model=name, num_classes=num_classes, sha256=sha256_file(ckpt), classes=classes)
    return model.eval(), info


def _qat_source(ckpt: Path, blob: dict, info: dict) -> tuple[QATNet, dict]:
    """The trained QATNet of a QAT checkpoint (its FP source model rebuilt, its learned state loaded)."""
    qat, name = blob["qat"], blob.get("model_name")
    if not isinstance(qat, dict) or qat.get("format") != QAT_FORMAT or not isinstance(qat.get("source"), dict):
        raise PlateauError(f"checkpoint {ckpt}: its 'qat' entry is not one this Plateau reads (format "
                           f"{qat.get('format') if isinstance(qat, dict) else qat!r})")
    if not isinstance(name, str) or not isinstance(blob.get("plateau_cfg"), dict):
        raise PlateauError(f"checkpoint {ckpt}: a QAT checkpoint without its model name and configuration")
    source = rebuild_model(name, int(blob.get("num_classes", 10)), blob["plateau_cfg"])
    try:
        source.load_state_dict(qat["source"])
    except RuntimeError as e:
        raise PlateauError(f"checkpoint {ckpt}: the FP model inside does not fit {name} "
                           f"({str(e).splitlines()[0][:160]})") from None
    try:
        qcfg = QuantConfig.from_dict(qat["quant_config"])
    except (TypeError, ValueError) as e:
        raise PlateauError(f"checkpoint {ckpt}: bad QAT quantization config ({e})") from None
    net = QATNet.from_state(source.eval(), qcfg, blob["model"], bool(qat.get("bn_batch_statistics")))
    classes = blob.get("classes")
    info.update(model=name, num_classes=int(blob.get("num_classes", 10)), sha256=sha256_file(ckpt),
                classes=classes if isinstance(classes, list) else None, qat=qcfg.bits_name)
    return net, info


def _refuse_ptq_options(args: argparse.Namespace, ckpt: str, bits: str) -> None:
    """A QAT checkpoint carries its quantization: an option that would choose another is refused by name."""
    if args.bits and args.bits.strip().upper() != bits:
        raise PlateauError(f"--bits {args.bits}: checkpoint {ckpt} was trained with --qat at {bits}; export it at "
                           f"{bits} (leave --bits out)")
    extra = {"fast": "--fast", "mixed_precision": "--mixed-precision", "sensitivity": "--sensitivity",
             "sensitivity_images": "--sensitivity-images", "onnx": "--onnx"}
    given = [flag for key, flag in extra.items() if getattr(args, key, None) not in (None, False)]
    for f in fields(QuantConfig):
        if "help" in f.metadata and hasattr(args, f.name):  # a CLI option of the quantization config
            default = None if f.name in PRESET_FIELDS else f.metadata.get("cli_default", f.default)
            if getattr(args, f.name) != default:
                given.append(option_name(f))
    if given:
        raise PlateauError(f"{given[0]}: checkpoint {ckpt} is a QAT checkpoint ({bits}): its learned weights and "
                           "scales are written as they are; PTQ options do not apply to it")


def _calibration_batches(train, cfg: QuantConfig, mean, std) -> list[torch.Tensor]:
    # An empty or too small set is refused by main() and by calibrate().
    return [x for x, _ in batches(train, 128, mean, std, shuffle=True, seed=cfg.seed, limit=cfg.calib_images)]


def export_model(model: torch.nn.Module | QGraph, calib: list[torch.Tensor], cfg: QuantConfig, out_dir: str | Path,
                 meta: dict | None = None, source: dict | None = None,
                 four_bit: str = "widened") -> tuple[FakeQuantModel, dict]:
    """Quantize `model` (a torch module, or a graph read from ONNX) and write model_qdq.onnx, model_fp32.onnx and
    reference.pt into out_dir (atomically); `four_bit` is the QDQ layout below 8 bits (see onnx_writer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, QATNet):  # trained at its bits: the learned weights and scales as they are
        ref, model = model.to_reference(), model.source_model()
    elif isinstance(model, QGraph):
        ref = quantize_graph(model, calib, cfg, progress=True, model_cfg=(source or {}).get("plateau_cfg"))
    else:
        ref = quantize_model(model, calib, cfg, progress=True)
    meta = {"plateau.bits": cfg.bits_name, "plateau.calibration": cfg.act_calibration,
            "plateau.rounding": cfg.rounding, "plateau.config": json.dumps(cfg.to_dict()), **(meta or {})}
    for name, proto in (("model_qdq.onnx", to_qdq_onnx(ref, meta, four_bit)),
                        ("model_fp32.onnx", to_float_onnx(ref, meta))):
        with atomic_path(out_dir / name) as tmp:
            onnx.save(proto, str(tmp))
    save_torch(out_dir / "reference.pt", reference_state(ref, model, source))
    return ref, meta


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    out = run / "export"
    t0 = time.time()
    if args.onnx and getattr(args, "qat", False):
        raise PlateauError("--qat exports a QAT checkpoint; --onnx quantizes an FP32 ONNX file: choose one")
    for key in ("sensitivity", "sensitivity_images"):
        if getattr(args, key, None) is not None and args.mixed_precision is None:
            raise PlateauError(f"--{key.replace('_', '-')} chooses how --mixed-precision measures layers: add "
                               "--mixed-precision AVG_BITS")
    try:
        w_bits, a_bits = parse_bits(args.bits or "W8A8")
    except ValueError as e:
        raise PlateauError(str(e)) from None
    preset = ptq_defaults(w_bits, a_bits, getattr(args, "fast", False))
    chosen = {k: v for k, v in preset.items() if getattr(args, k, None) is None}
    cfg = config_from_args(QuantConfig, args, weight_bits=w_bits, act_bits=a_bits, **chosen)
    if args.onnx:
        if not args.data:
            raise PlateauError("--onnx needs --data (calibration and test images)")
        model = read_onnx(args.onnx, allow_float=cfg.allow_float)
        mcfg = {"input_size": model.input_shape[1:], "mean": list(args.mean or IMAGENET_MEAN),
                "std": list(args.std or IMAGENET_STD)}
        src = {"checkpoint": str(args.onnx), "onnx": str(Path(args.onnx).resolve()), "sha256": sha256_file(args.onnx),
               "model": Path(args.onnx).stem, "plateau_cfg": mcfg}
    else:
        model, src = resolve_source(run, args.checkpoint, args.model, args.img_size,
                                    parse_model_kwargs(args.model_kwargs))
        mcfg = model_cfg(model)
        if getattr(args, "qat", False) and not isinstance(model, QATNet):
            raise PlateauError(f"--qat: checkpoint {src['checkpoint']} is not a QAT checkpoint (make one with "
                               "`plateau train --qat`)")
        if isinstance(model, QATNet):
            _refuse_ptq_options(args, src["checkpoint"], src["qat"])
            cfg = model.qcfg
    data = args.data or src.get("data") or SYNTHETIC
    mean, std = mcfg["mean"], mcfg["std"]
    size = args.img_size or (mcfg["input_size"][-1] if str(data) == SYNTHETIC else None)
    train, test = load_splits(data, size)
    check_image_size(train, mcfg["input_size"], src["model"])
    if not args.onnx:  # the head's class i must be the data's class i, or every score is nonsense
        check_classes(train, src.get("classes"), src.get("num_classes"), f"checkpoint {src['checkpoint']}", data)
    qat = isinstance(model, QATNet)
    if cfg.calib_images > len(train) and not qat:
        if args.calib_images is not None:
            raise PlateauError(f"--calib-images {cfg.calib_images} exceeds the {len(train)} training images in "
                               f"{data}")
        cfg.calib_images = len(train)  # the preset asks for more than there are: take them all
    calib = [] if qat else _calibration_batches(train, cfg, mean, std)
    mixed = None
    if args.mixed_precision is not None:
        graph = model if isinstance(model, QGraph) else capture(model, [1, *mcfg["input_size"]], cfg.allow_float)
        mixed = mixed_precision(graph, calib, cfg, args.mixed_precision, getattr(args, "sensitivity", None) or "kl",
                                getattr(args, "sensitivity_images", None) or 256)
        cfg.layer_bits = mixed["layer_bits"]
    if qat:
        print(f"export: {src['model']} at {cfg.bits_name} from quantization-aware training: its learned weights "
              "and scales, no calibration")
    else:
        print(f"export: {src['model']} at {cfg.bits_name}, {cfg.act_calibration} calibration on {cfg.calib_images} "
              f"train images, {cfg.rounding} rounding"
              + (f" per {cfg.reconstruction}{' with learned activation clipping' if cfg.learn_act_clip else ''}"
                 if cfg.rounding == "adaround" else ""))
    layout = getattr(args, "four_bit_layout", "widened")
    # Every file goes into a staging folder that replaces <run>/export only once all of them are written.
    with staged_output(out) as stage:
        report = _export_into(stage, args, cfg, model, src, mcfg, data, size, train, test, calib, mixed, layout, t0)
    print(render_report(report))
    return report


def _finite_logits(logits: np.ndarray, what: str, src: dict, n_classes: int) -> None:
    """Refuse logits no later stage can be held to: NaN/inf (broken weights) or another class count."""
    if not np.isfinite(logits).all():
        raise PlateauError(f"the {what} outputs NaN/inf on the test images: the weights of {src['checkpoint']} "
                           "overflow (diverged training?); nothing was written")
    if logits.ndim != 2 or logits.shape[1] != n_classes:
        raise PlateauError(f"{src['checkpoint']}: the model has {logits.shape[1:]} outputs but the data has "
                           f"{n_classes} classes: use the data the model was trained on")


def _export_into(out: Path, args: argparse.Namespace, cfg: QuantConfig, model, src: dict, mcfg: dict, data: str,
                 size: int | None, train, test, calib: list, mixed: dict | None, layout: str, t0: float) -> dict:
    """Quantize, validate and write every export file into `out` (the staging folder); the report."""
    mean, std = mcfg["mean"], mcfg["std"]
    ref, meta = export_model(model, calib, cfg, out, {"plateau.source_sha256": src["sha256"],
                                                      "plateau.model": src["model"]}, source=src, four_bit=layout)

    # Validation on the test split: FP (folded float), the reference, onnxruntime FP32 and QDQ. A limit takes a
    # fixed random subset (ImageFolder order is sorted by class); validate reads the same indices.
    lim = args.eval_limit
    idx = np.arange(len(test)) if not lim or lim >= len(test) else np.sort(
        np.random.default_rng(0).permutation(len(test))[:lim])
    classes = list(test.classes)
    test = test.subset(idx)
    lim = None
    labels = test.labels
    fp = logits_of(torch_fn(ref.float_forward), test, mean, std, limit=lim, desc="fp32")
    _finite_logits(fp, "float model", src, len(classes))
    rl = logits_of(torch_fn(ref), test, mean, std, limit=lim, desc="reference")
    _finite_logits(rl, "quantized reference", src, len(classes))
    report: dict = {
        "model": src["model"], "data": str(data), "bits": cfg.bits_name, "config": cfg.to_dict(),
        "test_images": int(len(labels)),
        "top1": {"fp32": top1(fp, labels), "reference": top1(rl, labels)},
        "output_step": ref.output_step,
        "float_islands": [{"node": n.name, "module": n.module, "kind": n.attrs["kind"]}
                          for n in ref.graph.nodes if n.op == "float"],
        # islands computed from their integers instead: exact forms (default), --integer-only's forms
        "integer_islands": [{"node": n.name, "module": n.module, "kind": n.attrs["kind"], "form": n.op}
                            for n in ref.graph.nodes if n.op in ISLAND_FORMS],
        "quantization_aware_training": bool(src.get("qat")),  # learned scales written as they are
        "onnxruntime_session": dict(ORT_INT8_QDQ),
        "four_bit_layout": layout,
    }
    if mixed is not None:  # the choice, without the per-layer table the manifest keeps
        report["mixed_precision"] = {k: v for k, v in mixed.items() if k != "sensitivity"}
    try:
        ort_fp = logits_of(ort_fn(ort_session(out / "model_fp32.onnx")), test, mean, std, limit=lim, desc="ort fp32")
        ort_q = logits_of(ort_fn(ort_session(out / "model_qdq.onnx")), test, mean, std, limit=lim, desc="ort qdq")
        report["top1"].update(onnxruntime_fp32=top1(ort_fp, labels), onnxruntime_qdq=top1(ort_q, labels))
        report["onnxruntime_vs_reference"] = compare_logits(ort_q, rl, ref.output_step)
        report["onnxruntime_kernels"] = ort_kernels(out / "model_qdq.onnx")
        if (not cfg.act_signed and ort_u8s8_saturates()
                and not all(ort_u8s8_pairs_fit(int(w.q.abs().max())) for w in ref.weights.values())):
            report["onnxruntime_note"] = (
                "this CPU is x86-64 without VNNI: onnxruntime's U8S8 kernels add pairs of uint8 x int8 products in "
                "int16 (vpmaddubsw), which saturates with 8-bit weights, so its logits are no check of the reference "
                "here; int8 activations (the default) are exact, and so is a CPU with VNNI or an ARM one")
        report["onnxruntime_fp32_max_abs_diff"] = float(np.abs(ort_fp - fp).max())
        save_npy(out / "ort_logits.npy", ort_q)
    except Exception as e:  # onnxruntime cannot run some configurations (e.g. 4-bit activations)
        report["onnxruntime_error"] = f"onnxruntime could not run {cfg.bits_name}: {str(e).splitlines()[0][:300]}"
    save_npy(out / "reference_logits.npy", rl)
    save_npy(out / "labels.npy", labels)
    save_npy(out / "test_indices.npy", idx)
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_report(report))
    a_in = ref.acts[ref.graph.nodes[0].name]
    a_out = ref.acts[ref.graph.quant_source(ref.graph.output)]
    files = {k: k for k in ("model_qdq.onnx", "model_fp32.onnx", "reference.pt", "reference_logits.npy",
                            "labels.npy", "test_indices.npy", "report.json", "report.md")}
    if (out / "ort_logits.npy").is_file():
        files["ort_logits.npy"] = "ort_logits.npy"
    write_manifest(out, "export", config={**cfg.to_dict(), "bits": cfg.bits_name, "model": src["model"],
                                          "data": str(data), "img_size": size, "four_bit_layout": layout,
                                          "qat": bool(src.get("qat"))},
                   classes=classes,
                   outputs=files, inputs={"checkpoint": {"path": src["checkpoint"], "sha256": src["sha256"]}},
                   model=src["model"], plateau_cfg=mcfg,
                   quantization={"input": {"scale": a_in.scale, "zero_point": a_in.zero_point,
                                           "dtype": a_in.qtype.storage},
                                 "output": {"scale": a_out.scale, "zero_point": a_out.zero_point,
                                            "dtype": a_out.qtype.storage}},
                   eval_limit=args.eval_limit, qdq_sha256=sha256_file(out / "model_qdq.onnx"), mixed_precision=mixed)
    return report
