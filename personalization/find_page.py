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


def make_thumbnail(path: str | Path, side: int = THUMB_SIDE) -> bytes | None:
    """A JPEG thumbnail of a photo (upright, at most ``side`` px), or None when it cannot be read any more."""
    from personalization.datasets.images import load_image
    from personalization.errors import UserError

    try:
        image = load_image(Path(path))[0]
    except (UserError, OSError):
        return None
    image.thumbnail((side, side))
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
) -> str:
    """The page for ``rows`` (sorted by personalized score, with ``rank`` and ``pretrained_rank``)."""
    top = list(rows[:top_k])
    pretrained_top = sorted(rows, key=lambda row: row["pretrained_rank"])[:top_k]
    personalized = "".join(_card(row, thumbnails.get(row["path"]), True) for row in top)
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
