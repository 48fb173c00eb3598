"""Reports as Markdown, self-contained HTML (plots embedded as base64 PNGs) and JSON, written atomically.

    >>> doc = Document("Validation: resnet20 W8A8 on arm64")
    >>> doc.text("10000 test images.").table(["model", "top-1"], [["device", "91.20%"]])
    >>> doc.figure("accuracy", accuracy_plot({"device": 0.912, "reference": 0.912}))
    >>> doc.write("runs/r1/validate/arm64", data=report_dict)     # report.md, report.html, report.json, *.png

The HTML opens in a browser with no server and no files beside it; report.md references the PNGs next to it.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from plateau.artifacts import atomic_path, write_json, write_text

__all__ = ["Document", "accuracy_plot", "latency_plot", "layer_plot", "steps_plot", "pct", "ms"]

_CSS = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em}code{background:#f5f5f5}")


def pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def ms(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


@dataclass
class Document:
    """An ordered list of blocks (heading, text, warning, table, figure) rendered to Markdown and HTML."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> Document:
        self.blocks.append(("h2", text))
        return self

    def text(self, text: str) -> Document:
        self.blocks.append(("p", text))
        return self

    def warning(self, text: str) -> Document:
        self.blocks.append(("warn", text))
        return self

    def table(self, header: list[str], rows: list[list]) -> Document:
        self.blocks.append(("table", header, [[str(c) for c in r] for r in rows]))
        return self

    def figure(self, name: str, png: bytes | None, caption: str = "") -> Document:
        if png:
            self.blocks.append(("fig", name, png, caption))
        return self

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b[0] == "h2":
                out += [f"## {b[1]}", ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "warn":
                out += [f"> **{b[1]}**", ""]
            elif b[0] == "table":
                out += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
            elif b[0] == "fig":
                out += [f"![{b[3] or b[1]}]({b[1]}.png)", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
               f"<style>{_CSS}</style></head><body><h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h2":
                out.append(f"<h2>{e(b[1])}</h2>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "warn":
                out.append(f"<p class='warn'><b>{_inline(b[1])}</b></p>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                out.append(f"<table><tr>{head}</tr>{rows}</table>")
            elif b[0] == "fig":
                data = base64.b64encode(b[2]).decode("ascii")
                out.append(f"<figure><img alt='{e(b[1])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(b[3])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, folder: str | Path, data: dict | None = None, stem: str = "report") -> dict[str, str]:
        """Write <stem>.md, <stem>.html, the PNGs and (given `data`) <stem>.json into folder, each
        atomically."""
        folder = Path(folder)
        files = {}
        for b in self.blocks:
            if b[0] == "fig":
                with atomic_path(folder / f"{b[1]}.png") as tmp:
                    tmp.write_bytes(b[2])
                files[b[1]] = f"{b[1]}.png"
        if data is not None:
            write_json(folder / f"{stem}.json", data)
            files["json"] = f"{stem}.json"
        write_text(folder / f"{stem}.md", self.markdown() + "\n")
        write_text(folder / f"{stem}.html", self.html() + "\n")
        files.update(md=f"{stem}.md", html=f"{stem}.html")
        return files


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** spans (the only Markdown used inside blocks)."""
    import re

    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


# --- plots --------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps tests from opening windows
    import matplotlib.pyplot as plt

    return plt


def accuracy_plot(groups: dict[str, dict[str, float]], title: str = "top-1 per bit width") -> bytes:
    """Grouped bars: groups = {"fp32": {"TVM": 0.91, "onnxruntime": 0.91}, "W8A8": {...}, "W4A8": {...}}."""
    plt = _plt()
    import numpy as np

    engines = sorted({e for g in groups.values() for e in g})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(engines))
    xs = np.arange(len(groups))
    for i, eng in enumerate(engines):
        vals = [100 * groups[g].get(eng, np.nan) for g in groups]
        bars = ax.bar(xs + i * width - 0.4 + width / 2, vals, width, label=eng)
        for b, v in zip(bars, vals, strict=True):
            if not np.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, list(groups))
    ax.set_ylabel("top-1 (%)")
    lo = min([100 * v for g in groups.values() for v in g.values()] or [0])
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def latency_plot(rows: list[dict], batches: list[int], title: str) -> bytes:
    """One panel per batch size: median bars with min..p90 whiskers; rows = [{"engine", "batch_<b>":
    {...}}]."""
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 0.45 * len(rows) + 1.6),
                             squeeze=False)
    names = [r["engine"] for r in rows]
    for ax, b in zip(axes[0], batches, strict=True):
        stats = [r.get("latency", {}).get(f"batch_{b}") or {} for r in rows]
        med = np.array([s.get("median_ms", np.nan) for s in stats], dtype=float)
        lo = np.array([s.get("min_ms", np.nan) for s in stats], dtype=float)
        hi = np.array([s.get("p90_ms", np.nan) for s in stats], dtype=float)
        ys = np.arange(len(rows))
        ax.barh(ys, med, color="#4c72b0")
        ax.errorbar(med, ys, xerr=[np.nan_to_num(med - lo), np.nan_to_num(hi - med)], fmt="none", ecolor="k",
                    capsize=3, lw=1)
        for y, v in zip(ys, med, strict=True):
            if not np.isnan(v):
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
        ax.set_yticks(ys, names if ax is axes[0][0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_xlabel(f"ms per call, batch {b} (median; whiskers min..p90)")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def layer_plot(rows: list[dict], first: str | None, tolerance: int) -> bytes:
    """Max and mean |difference| in integer steps per layer (graph order); the first divergent layer in
    red."""
    plt = _plt()
    import numpy as np

    names = [r["layer"] for r in rows]
    mx = np.array([r["max_steps"] for r in rows], dtype=float)
    mean = np.array([r["mean_abs_steps"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 3.8))
    xs = np.arange(len(rows))
    colors = ["#c44e52" if n == first else "#4c72b0" for n in names]
    ax.bar(xs, mx, color=colors, label="max |diff|")
    ax.plot(xs, mean, "k.", label="mean |diff|")
    ax.axhline(tolerance, color="gray", ls="--", lw=1, label=f"tolerance ({tolerance} step)")
    ax.set_xticks(xs, names, rotation=75, fontsize=7)
    ax.set_ylabel("difference (integer steps)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(0, max(2.0, float(mx.max(initial=0)) * 1.5))
    where = f" (first: {first})" if first else ""
    ax.set_title("per-layer difference, device vs fake-quant reference" + where)
    ax.legend(fontsize=8)
    return _png(fig)


def steps_plot(histograms: dict[str, dict[str, int]]) -> bytes:
    """Logit differences in output steps (0..9, 10 = 10 or more), one series per comparison."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = np.arange(11)
    width = 0.8 / max(1, len(histograms))
    for i, (name, h) in enumerate(histograms.items()):
        total = max(1, sum(h.values()))
        vals = [100 * h.get(str(k), 0) / total for k in range(11)]
        ax.bar(xs + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(xs, [str(k) for k in range(10)] + ["10+"])
    ax.set_yscale("log")
    ax.set_xlabel("|logit difference| in output steps")
    ax.set_ylabel("% of logits")
    ax.legend(fontsize=8)
    return _png(fig)
