"""``index.html`` of `personalize find`: the top hits as inline thumbnails, personalized and pretrained side by side.

One self-contained file (thumbnails inlined as base64 JPEG), so it opens anywhere and can be mailed. Each hit shows
its score under both encoders and the rank the other encoder gave the same photo.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

THUMB_SIDE = 160
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.hit{width:172px;font-size:12px;border:1px solid #ddd;border-radius:6px;padding:5px;background:#fafafa}
.hit img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.p{color:#0a5}.b{color:#777}
.columns{display:flex;gap:28px;align-items:flex-start}
"""


def make_thumbnail(path: str | Path, side: int = THUMB_SIDE, mask: np.ndarray | None = None) -> bytes | None:
    """A JPEG thumbnail of a photo (upright, at most ``side`` px), or None when it cannot be read any more.

    ``mask``: a predicted (h, w) object mask of the photo at any scale, drawn as a red tint with its box.
    """
    from personalization.datasets.images import load_image
    from personalization.errors import UserError

    try:
        image = load_image(Path(path))[0]
    except (UserError, OSError):
        return None
    image.thumbnail((side, side))
    if mask is not None and mask.any():
        shown = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
        red = Image.new("RGB", image.size, (230, 30, 30))
        image = Image.composite(Image.blend(image, red, 0.45), image, shown)
        ys, xs = np.nonzero(np.asarray(shown))
        ImageDraw.Draw(image).rectangle((xs.min(), ys.min(), xs.max(), ys.max()), outline=(255, 230, 0), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _card(row: Mapping, thumbnail: bytes | None, personalized_first: bool) -> str:
    path = str(row["path"])
    image = (
        f'<img alt="{html.escape(Path(path).name)}" src="data:image/jpeg;base64,'
        f'{base64.b64encode(thumbnail).decode("ascii")}">'
        if thumbnail
        else '<div style="width:160px;height:160px;background:#eee">unreadable now</div>'
    )
    mine = f'<div class="p">personalized {row["score"]:.3f} (#{row["rank"]})</div>'
    if personalized_first and row.get("box_score") not in (None, ""):
        mine += f'<div class="p">found: box confidence {row["box_score"]:.3f}</div>'
    base = f'<div class="b">pretrained {row["pretrained_score"]:.3f} (#{row["pretrained_rank"]})</div>'
    lines = mine + base if personalized_first else base + mine
    name = f'<div class="name" title="{html.escape(path)}">{html.escape(Path(path).name)}</div>'
    return f'<div class="hit">{image}{name}{lines}</div>'


def render_find_page(
    instance_id: str,
    rows: Sequence[Mapping],
    thumbnails: Mapping[str, bytes | None],
    *,
    top_k: int,
    gallery: str,
    skipped: int,
    located: Mapping[str, bytes | None] = {},
) -> str:
    """The page for ``rows`` (sorted by personalized score, with ``rank`` and ``pretrained_rank``); ``located``:
    thumbnails with the predicted mask and box (find.localize), shown for the personalized hits."""
    top = list(rows[:top_k])
    pretrained_top = sorted(rows, key=lambda row: row["pretrained_rank"])[:top_k]
    personalized = "".join(_card(row, located.get(row["path"]) or thumbnails.get(row["path"]), True) for row in top)
    pretrained = "".join(_card(row, thumbnails.get(row["path"]), False) for row in pretrained_top)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>find {html.escape(instance_id)}</title><style>{_STYLE}</style></head><body>
<h1>Where is {html.escape(instance_id)}?</h1>
<p>{len(rows)} photos in {html.escape(gallery)} ranked by max cosine to the object's own photos;
{skipped} file(s) skipped (<a href="skipped.csv">skipped.csv</a>); every photo: <a href="results.csv">results.csv</a>.
(#N) is the rank each encoder gave the photo.</p>
<div class="columns">
<div><h2>Personalized encoder: top {len(top)}</h2><div class="grid">{personalized}</div></div>
<div><h2>Pretrained encoder: top {len(pretrained_top)}</h2><div class="grid">{pretrained}</div></div>
</div></body></html>
"""
