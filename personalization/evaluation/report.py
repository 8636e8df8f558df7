"""One self-contained ``report.html``: metrics table, loss curves, PR curves, sample images and predicted masks.

Every image is inlined as a base64 PNG, so the file can be mailed or opened anywhere. Plots use matplotlib's
Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

MODELS = ("pretrained", "personalized")


def _png_tag(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{data}">'


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _format(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def render_metrics_table(summary: Mapping) -> str:
    """HTML table: one row per metric, columns pretrained / personalized / delta (means), then per instance."""
    means = {model: summary.get(model, {}) for model in MODELS}
    keys = sorted(set(means["pretrained"]) | set(means["personalized"]))
    if not keys:
        return "<p>No metrics.</p>"
    rows = ["<tr><th>metric</th><th>pretrained</th><th>personalized</th><th>delta</th></tr>"]
    for key in keys:
        before, after = means["pretrained"].get(key, math.nan), means["personalized"].get(key, math.nan)
        delta = after - before if isinstance(before, float) and isinstance(after, float) else math.nan
        rows.append(
            f"<tr><td>{html.escape(key)}</td><td>{_format(before)}</td><td>{_format(after)}</td>"
            f"<td>{_format(delta)}</td></tr>"
        )
    parts = ["<h2>Metrics (mean over instances)</h2>", f"<table>{''.join(rows)}</table>"]
    parts.append(render_split_table(summary.get("per_split", {})))
    per_instance = summary.get("per_instance", {})
    if per_instance:
        header = "".join(f"<th>{html.escape(k)}<br>pre / pers</th>" for k in keys)
        rows = [f"<tr><th>instance</th>{header}</tr>"]
        for instance, by_model in sorted(per_instance.items()):
            cells = "".join(
                f"<td>{_format(by_model.get('pretrained', {}).get(k, math.nan))} / "
                f"{_format(by_model.get('personalized', {}).get(k, math.nan))}</td>"
                for k in keys
            )
            rows.append(f"<tr><td>{html.escape(str(instance))}</td>{cells}</tr>")
        parts += ["<h2>Per instance</h2>", f"<table>{''.join(rows)}</table>"]
    return "\n".join(parts)


def render_split_table(per_split: Mapping) -> str:
    """HTML table of the per-split means (``metrics.json``'s ``per_split``): one row per test split, a
    ``pretrained / personalized`` cell per metric; empty text without splits."""
    splits = list(dict.fromkeys(s for model in MODELS for s in per_split.get(model, {})))
    if not splits:
        return ""
    cell = lambda model, split, key: _format(per_split.get(model, {}).get(split, {}).get(key, math.nan))  # noqa: E731
    keys = list(
        dict.fromkeys(k for model in MODELS for by_split in per_split.get(model, {}).values() for k in by_split)
    )
    header = "".join(f"<th>{html.escape(k)}<br>pre / pers</th>" for k in keys)
    rows = [f"<tr><th>test split</th>{header}</tr>"]
    for split in splits:
        cells = "".join(f"<td>{cell('pretrained', split, k)} / {cell('personalized', split, k)}</td>" for k in keys)
        rows.append(f"<tr><td>{html.escape(split)}</td>{cells}</tr>")
    return f"<h2>Per test split (mean over instances)</h2><table>{''.join(rows)}</table>"


def plot_loss_history(loss_history: Mapping[str, Sequence[float]]) -> bytes:
    """PNG of the training loss per step, one line per instance."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for instance, losses in sorted(loss_history.items()):
        axis.plot(np.arange(1, len(losses) + 1), losses, label=str(instance))
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("Contrastive training loss")
    if len(loss_history) <= 10:
        axis.legend(fontsize="small")
    png = _figure_png(figure)
    plt.close(figure)
    return png


def plot_pr_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str) -> bytes:
    """PNG of precision vs recall, one line per instance."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4))
    for instance, (precision, recall) in sorted(curves.items()):
        axis.step(recall, precision, where="post", label=str(instance))
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_title(title)
    if len(curves) <= 10:
        axis.legend(fontsize="small")
    png = _figure_png(figure)
    plt.close(figure)
    return png


def overlay_mask(image_png: bytes, mask_png: bytes) -> bytes:
    """The image with the predicted mask tinted red (the mask is resized to the image if needed)."""
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    mask = Image.open(io.BytesIO(mask_png)).convert("L").resize(image.size, Image.NEAREST)
    tinted = Image.blend(image, Image.new("RGB", image.size, (255, 0, 0)), 0.5)
    image.paste(tinted, mask=mask.point(lambda v: 255 if v > 127 else 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
td:first-child { text-align: left; }
figure { display: inline-block; margin: 6px; text-align: center; font-size: small; }
.note { background: #fff6d5; padding: 6px 10px; border-left: 4px solid #e0b000; }
"""


def write_report(
    out_path: str | Path,
    summary: dict,
    *,
    loss_history: Mapping[str, Sequence[float]] = {},
    pr_curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] = {},
    sample_images: Sequence[tuple[str, bytes]] = (),
    mask_examples: Sequence[tuple[str, bytes, bytes]] = (),
    derived_masks: Sequence[tuple[str, bytes, bytes]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the HTML report and return its path.

    ``summary``: ``{"pretrained": {metric: mean}, "personalized": {...}, "per_instance": {id: {model: {...}}}}``
    and optionally ``"per_split": {model: {split: {metric: mean}}}`` (the evaluate stage's ``metrics.json``).
    ``pr_curves``: model -> instance -> (precision, recall).
    ``sample_images``: (caption, PNG). ``mask_examples``: (caption, image PNG, predicted-mask PNG).
    ``derived_masks``: (caption, photo PNG, mask PNG) of the masks ingest derived, shown for the user to check.
    """
    body = [f"<h1>{html.escape(str(summary.get('name', 'Personalized representations')))}</h1>"]
    body += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    body.append(render_metrics_table(summary))
    if loss_history:
        body += ["<h2>Training loss</h2>", _png_tag(plot_loss_history(loss_history), "training loss")]
    pr_curves = {model: curves for model, curves in pr_curves.items() if curves}  # none when nothing was measured
    if pr_curves:
        body.append("<h2>Classification precision-recall</h2>")
        body += [_png_tag(plot_pr_curves(curves, model), f"PR curves {model}") for model, curves in pr_curves.items()]
    if sample_images:
        body.append("<h2>Sample images</h2>")
        body += [
            f"<figure>{_png_tag(png, caption, 160)}<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, png in sample_images
        ]
    if derived_masks:
        body.append("<h2>Derived masks (red): check them</h2>")
        body.append(
            '<p class="note">These photos had no mask in masks/, so GrabCut derived one. A wrong one teaches the '
            "encoder the wrong object: fix it with masks/&lt;stem&gt;.png or a box in boxes.json.</p>"
        )
        body += [
            f"<figure>{_png_tag(overlay_mask(image, mask), caption, 200)}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, image, mask in derived_masks
        ]
    if mask_examples:
        body.append("<h2>Predicted masks (red)</h2>")
        body += [
            f"<figure>{_png_tag(overlay_mask(image, mask), caption, 200)}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, image, mask in mask_examples
        ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Report</title><style>{_STYLE}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page)
    return out_path


def load_evaluation_outputs(evaluate_dir: str | Path) -> dict:
    """``write_report`` keyword arguments from a committed OUT/evaluate/: ``pr_curves`` and ``mask_examples``."""
    import json

    evaluate_dir = Path(evaluate_dir)
    curves_file, examples_file = evaluate_dir / "pr_curves.json", evaluate_dir / "mask_examples.json"
    pr_curves = {}
    if curves_file.is_file():
        pr_curves = {
            model: {i: (np.asarray(c["precision"]), np.asarray(c["recall"])) for i, c in curves.items()}
            for model, curves in json.loads(curves_file.read_text()).items()
        }
    mask_examples = []
    if examples_file.is_file():
        mask_examples = [
            (e["caption"], (evaluate_dir / e["image"]).read_bytes(), (evaluate_dir / e["mask"]).read_bytes())
            for e in json.loads(examples_file.read_text())
        ]
    return {"pr_curves": pr_curves, "mask_examples": mask_examples}
