"""Backgrounds for Cut-and-Paste: real photos from a folder, prompts for generated scenes, or procedural scenes.

Generated backgrounds (the paper's) are sampled by the pretrained generator from background prompts: the built-in
bank's (personalization/synthesis/prompts.py: make_background_prompts) or an LLM's
(:func:`write_background_prompts_with_llm`); pipelines/cutpaste_backgrounds.py makes and commits them.

Procedural scenes stand in for generated or photographed backgrounds when neither is wanted. Each
scene is a wall (vertical colour gradient with blotchy low-frequency shading) above a surface (wood grain, tiles,
cloth or plain) meeting it at a horizon or table edge, with a few soft furniture-like shapes, a light falloff
and sensor-like noise. They hold no objects of any category: only textures and flat shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from personalization.errors import MissingInputError, UserError
from personalization.schema import make_image_id
from personalization.synthesis.llm import LLMEndpoint, chat
from personalization.synthesis.prompts import PromptError
from personalization.synthesis.prompts_llm import ROUNDS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
log = logging.getLogger(__name__)


def load_backgrounds(folder: str | Path, *, max_side: int | None = None) -> list[Image.Image]:
    """Every readable photo under ``folder`` (recursive, sorted by relative path), as RGB PIL images.

    ``max_side`` shrinks large photos (keeping aspect) so a worker holding hundreds of them stays small.
    Unreadable files are skipped with a warning; a folder with no readable image is an error naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(
            f"background folder {folder} does not exist; set cutpaste.backgrounds_dir to a "
            "folder of photos, or leave it empty for procedural backgrounds"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            log.warning("skipping unreadable background %s (%s)", file, error)
            continue
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        images.append(image)
    if not images:
        raise UserError(
            f"background folder {folder} holds no readable image (looked for {', '.join(IMAGE_EXTENSIONS)}"
            " recursively); add photos of empty scenes, or leave cutpaste.backgrounds_dir empty"
        )
    return images


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float noise in [0, 1] varying over about ``cells`` cells per side (bicubic upsampling)."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """An everyday-scene colour: moderate saturation, any brightness."""
    grey = rng.uniform(40, 220)
    return np.clip(grey + rng.normal(0, 35, size=3), 0, 255).astype(np.float32)


def _surface(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """(size, size, 3) texture of a floor or table top."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.choice(["wood", "tiles", "cloth", "plain"])
    if kind == "wood":
        warp = _smooth_noise(rng, size, 4) * rng.uniform(2, 6)
        shade = 0.5 + 0.5 * np.sin(2 * np.pi * (ys * rng.uniform(8, 30) + warp))
        pattern = 0.75 + 0.25 * shade
    elif kind == "tiles":
        period = rng.uniform(0.08, 0.25)
        grout = (np.mod(xs, period) < 0.01) | (np.mod(ys, period) < 0.01)
        checker = (np.floor(xs / period) + np.floor(ys / period)) % 2
        pattern = np.where(grout, 0.6, 0.9 + 0.1 * checker * rng.uniform(0, 1))
    elif kind == "cloth":
        pattern = 0.85 + 0.15 * rng.random((size, size)).astype(np.float32)
    else:
        pattern = 0.8 + 0.2 * _smooth_noise(rng, size, 3)
    return colour[None, None, :] * pattern[..., None]


def make_procedural_background(index: int, size: int, seed: int) -> Image.Image:
    """Scene number ``index`` of the set made from ``seed``: (size, size) RGB, identical for identical inputs."""
    rng = np.random.default_rng(int(make_image_id("background", seed, index, size), 16))
    ys = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top, bottom = _muted_colour(rng), _muted_colour(rng)
    wall = top * (1 - ys) + bottom * ys
    wall = wall * (0.85 + 0.3 * _smooth_noise(rng, size, int(rng.integers(2, 6))))[..., None]
    canvas = np.broadcast_to(wall, (size, size, 3)).copy()
    if rng.random() < 0.85:  # a horizon or table edge; otherwise a bare wall or a top-down surface
        horizon = int(size * rng.uniform(0.3, 0.8))
        canvas[horizon:] = _surface(rng, size, _muted_colour(rng))[horizon:]
        canvas[horizon : horizon + max(1, size // 100)] *= 0.7  # the edge's shadow line
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 5))):  # frames, windows, cushions: flat shapes, never objects
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        fill = tuple(int(c) for c in _muted_colour(rng))
        box = [x0, y0, x0 + w, y0 + h]
        draw.ellipse(box, fill=fill) if rng.random() < 0.4 else draw.rectangle(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))
    pixels = np.asarray(image, dtype=np.float32)
    light = 1.0 - rng.uniform(0.0, 0.35) * np.linspace(0, 1, size, dtype=np.float32)  # light from one side
    light = light[None, :, None] if rng.random() < 0.5 else light[::-1][None, :, None]
    pixels = pixels * light + rng.normal(0, rng.uniform(1, 5), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_procedural_backgrounds(n: int, size: int, seed: int) -> list[Image.Image]:
    """``n`` varied (size, size) scenes, deterministic by ``seed``; scene i does not depend on ``n``."""
    if n <= 0 or size <= 0:
        raise ValueError(f"need n > 0 and size > 0 procedural backgrounds, got n={n}, size={size}")
    return [make_procedural_background(i, size, seed) for i in range(n)]


def _background_request(n: int) -> str:
    return (
        f"Write {n} different one-line prompts for a text-to-image model, each describing an empty everyday scene "
        "(a table top, a floor, a shelf, a room, a street, a garden...) in a different place, viewpoint or light, "
        "with nothing in the foreground: no object, person or animal as the subject. Reply with the prompts only, "
        "one per line."
    )


def parse_background_prompts(reply: str) -> list[str]:
    """The reply's non-empty lines, list markers and numbering stripped, in order, without repeats."""
    prompts = []
    for line in reply.splitlines():
        line = line.strip().lstrip("-*0123456789.) ").strip()
        if line and line not in prompts:
            prompts.append(line)
    return prompts


def write_background_prompts_with_llm(n: int, endpoint: LLMEndpoint, rounds: int = ROUNDS) -> list[str]:
    """``n`` distinct background prompts asked of ``endpoint`` (up to ``rounds`` requests); a PromptError when it
    still returned fewer."""
    prompts: list[str] = []
    for _ in range(rounds):
        prompts += [p for p in parse_background_prompts(chat(endpoint, _background_request(n))) if p not in prompts]
        if len(prompts) >= n:
            return prompts[:n]
    raise PromptError(
        f"{endpoint.url}: the LLM returned {len(prompts)} background prompts in {rounds} requests, asked "
        f"{n}; lower cutpaste.num_backgrounds or try another model"
    )
