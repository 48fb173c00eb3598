"""The run's report: report.json, report.md and the stage manifest, written once training ends."""

from __future__ import annotations

from pathlib import Path

from plateau.artifacts import write_json, write_manifest, write_text

from .config import TrainConfig
from .methods import get_method

__all__ = ["write_report", "report_markdown", "flatness_text"]


def write_report(out_dir: Path, cfg: TrainConfig, *, model_name: str, plateau_cfg: dict, classes: list[str],
                 history: list[dict], fp: dict, gap: dict, inputs: dict, seconds: float, world: int) -> dict:
    """Write report.json, report.md and manifest.json into `out_dir`; returns the report."""
    final = history[-1] if history else {}
    fp_top1 = gap["fp_top1"] if gap.get("qat") else fp["top1"]  # a QAT run's `fp` is its fake-quant forward
    final_flat = next((h["flatness"] for h in reversed(history) if "flatness" in h), None)
    first_flat = next((h["flatness"] for h in history if "flatness" in h), None)
    report = {
        "stage": "train",
        "model_name": model_name,
        "num_classes": len(classes),
        "classes": list(classes),
        "plateau_cfg": plateau_cfg,
        "config": cfg.to_dict(),
        "world_size": world,
        "epochs_run": len([h for h in history if h.get("epoch", 0) > 0]),
        "train_seconds": round(seconds, 1),
        "final": {k: v for k, v in final.items() if k != "flatness"},
        "fp_top1": fp_top1,
        "flatness_final": final_flat,
        "flatness_initial": first_flat if first_flat is not final_flat else None,
        "quant_gap": gap,
        "history": history,
    }
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", report_markdown(report))
    write_manifest(
        out_dir,
        "train",
        config=cfg.to_dict(),
        outputs={"checkpoint": "last.pt", "metrics": "metrics.jsonl", "report": "report.json",
                 "report_md": "report.md"},
        inputs=inputs,
        model_name=model_name,
        num_classes=len(classes),
        classes=list(classes),
        plateau_cfg=plateau_cfg,
        fp_top1=fp_top1,
    )
    return report


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def flatness_text(f: dict) -> str:
    """One line of a flatness measurement, for the console."""
    return (f" Hessian trace {_fmt(f['hessian_trace'])}, top eigenvalue {_fmt(f['top_eigenvalue'])}, "
            f"noise loss increase {_fmt(f['noise_loss_increase'])}")


def report_markdown(r: dict) -> str:
    """report.md from the report dict: the run in a few lines, then one table row per epoch."""
    c = r["config"]
    method = get_method(c["method"])
    setting = (f", QAT at {c['bits']}" if c.get("qat") else
               f" at {c['bits']}, alpha {c['alpha']}, target {c['noise_target']}"
               + (f", distilled from the starting model (kd {c['kd']})" if c.get("kd") else ""))
    lines = [
        f"# Training report: {r['model_name']} on {c['data']}",
        "",
        f"- method **{c['method']}**{setting}"
        + "".join(f", {label} {c[key]}" for label, key in method.report_fields.items()),
        f"- {r['epochs_run']} epoch(s), batch {c['batch_size']}, lr {c['lr']} ({c['optimizer']}, cosine), "
        f"seed {c['seed']}, {r['world_size']} process(es), {r['train_seconds']} s",
        f"- FP top-1 (test): **{r['fp_top1']:.2f}%**",
    ]
    g = r["quant_gap"]
    if g.get("qat"):
        lines[-1] = f"- FP top-1 (test) of the model QAT started from: **{r['fp_top1']:.2f}%**"
        lines.append(f"- QAT at {g['bits']}: the reference export writes (integer forward) "
                     f"**{g['reference_top1']:.2f}%** (gap {g['gap']:+.2f} points), "
                     f"the training forward (float fake-quant) {g['fake_quant_top1']:.2f}%")
    elif g.get("skipped"):
        lines.append(f"- quantization gap at {g['bits']}: not measured ({g['reason']})")
    else:
        lines.append(f"- PTQ top-1 at {g['bits']}: **{g['ptq_top1']:.2f}%** (gap {g['gap']:+.2f} points, "
                     f"{g['calib_images']} calibration images from the train split)")
    lines += ["",
              "| epoch | train loss | train acc | test top-1 | noise | Hessian trace | top eig | noise dL |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in r["history"]:
        f = h.get("flatness") or {}
        lines.append(
            f"| {h['epoch']} | {_fmt(h.get('train_loss'))} | {_fmt(h.get('train_acc'), '.2f')} | "
            f"{_fmt(h.get('test_top1'), '.2f')} | {_fmt(h.get('noise_scale'))} | "
            f"{_fmt(f.get('hessian_trace'))} | {_fmt(f.get('top_eigenvalue'))} | "
            f"{_fmt(f.get('noise_loss_increase'))} |"
        )
    lines += ["", "Flatness is measured on a fixed subset of the train split (eval mode, Conv/Linear "
              "weights); 'noise dL' is the Monte Carlo loss increase under Gaussian WQE+AQE at the target "
              "bits (alpha 1).", ""]
    return "\n".join(lines)
