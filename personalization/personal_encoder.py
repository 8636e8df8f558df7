"""A personalized encoder loaded from a run's output, Ray-free: for notebooks and services.

::

    from personalization import load_encoder
    enc = load_encoder("out/my_mug/train/my_mug")     # OUT/train/<instance>/ of a finished `personalize train`
    vectors = enc.embed(["a.jpg", "b.jpg"])            # (2, D) float32, unit L2 norm
    scores = enc.score(["a.jpg", "b.jpg"])             # (2,) similarity to the object's own photos
    base = enc.pretrained()                            # the same backbone without the adapter, to compare

The folder holds a stock peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and the resolved
``config.yaml`` the stage saved beside it; its ``model`` section rebuilds the backbone (``model.backbone`` +
``model.weights``: an HF id in the local cache or a local path) exactly as the stages do, then the adapter is
applied with ``PeftModel.from_pretrained``.

``embed`` is evaluation's embedding: the eval transform (resize, centre crop, the backbone's mean/std), the
``model.eval_feature`` head, no grad, eval mode (no LoRA dropout), in batches. ``score`` is evaluation's
classification score: the max cosine of an image's embedding to the embeddings of the object's real train photos,
the *whole* photos as ingest stored them (``role == real_train`` rows of ``OUT/ingest/images.parquet``; not masked
crops), so a photo of the object scores near 1 and the ranking matches ``classification/pr_auc``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from PIL import Image

from personalization.artifacts import RESOLVED_CONFIG, hash_config, input_hash
from personalization.config import ModelConfig, build_config, to_dict
from personalization.devices import pick_device
from personalization.errors import MissingInputError, UserError

if TYPE_CHECKING:
    from personalization.evaluation.dense import DensePrediction

ImageLike = Image.Image | str | os.PathLike
EXPECTED = (
    "expected OUT/train/<instance>/ of a finished `personalize train` (adapter_config.json, "
    "adapter_model.safetensors and config.yaml)"
)


def _check_adapter_dir(path: Path) -> None:
    """Raise a :class:`MissingInputError` naming ``path``, what it lacks and where trained encoders are."""
    if (path / "adapter_config.json").is_file() and (path / RESOLVED_CONFIG).is_file():
        return
    if not path.is_dir():
        raise MissingInputError(f"{path} does not exist or is not a folder; {EXPECTED}")
    trained = path / "train" if (path / "train").is_dir() else path
    found = sorted(p.name for p in trained.iterdir() if (p / "adapter_config.json").is_file())
    if found:
        raise MissingInputError(
            f"{path} is not the folder of one trained encoder; pass one of the encoders in it: "
            + ", ".join(str(trained / name) for name in found[:10])
        )
    lacks = "adapter_config.json" if not (path / "adapter_config.json").is_file() else RESOLVED_CONFIG
    raise MissingInputError(f"{path} has no {lacks}; {EXPECTED}")


def read_model_config(adapter_dir: str | Path) -> ModelConfig:
    """The ``model`` section of the resolved config saved beside the adapter."""
    adapter_dir = Path(adapter_dir)
    _check_adapter_dir(adapter_dir)
    saved = yaml.safe_load((adapter_dir / RESOLVED_CONFIG).read_text()) or {}
    if not isinstance(saved.get("model"), dict):
        raise UserError(f"{adapter_dir / RESOLVED_CONFIG}: no `model` section; {EXPECTED}")
    return build_config({"model": saved["model"]}).model


def encoder_identity(adapter_dir: str | Path, pretrained: bool = False) -> str:
    """A hash naming what the embeddings depend on, without loading a model (for embedding caches).

    Personalized: the adapter folder's manifest hash (its config and inputs), else its content. Pretrained: the
    model settings that shape an embedding (backbone, weights, image size, feature head).
    """
    model = read_model_config(adapter_dir)
    if pretrained:
        keys = ("backbone", "weights", "image_size", "eval_feature")
        return hash_config({"pretrained": {key: getattr(model, key) for key in keys}})
    return hash_config({"personalized": input_hash(adapter_dir), "eval_feature": model.eval_feature})


def open_image(image: ImageLike) -> Image.Image:
    """A PIL image as given, or a photo file read by the datasets' safe loader (EXIF-upright RGB)."""
    if isinstance(image, Image.Image):
        return image
    from personalization.datasets.images import load_image

    return load_image(Path(image))[0]


class PersonalEncoder:
    """One encoder (personalized, or its pretrained twin) with the object's reference photos; see the module doc.

    Built by :func:`load_encoder`. ``instance_id`` is the object's name; ``identity`` the hash of what the
    embeddings depend on (:func:`encoder_identity`); ``personalized`` whether the adapter is applied.
    """

    def __init__(self, adapter_dir: Path, *, pretrained: bool, device: str, batch_size: int):
        from personalization.models import build_encoder, build_transform, load_adapter

        self.adapter_dir, self.personalized, self.batch_size = adapter_dir, not pretrained, batch_size
        self.instance_id = adapter_dir.name
        self.model_cfg = read_model_config(adapter_dir)
        self.identity = encoder_identity(adapter_dir, pretrained=pretrained)
        self.device = pick_device(device)
        encoder = build_encoder(self.model_cfg)
        if not pretrained:
            encoder = load_adapter(encoder, adapter_dir)
        self.encoder = encoder.to(self.device).eval()
        self.transform = build_transform(self.model_cfg, train=False)

    def __repr__(self) -> str:
        kind = "personalized" if self.personalized else "pretrained"
        return f"PersonalEncoder({self.instance_id!r}, {kind} {self.model_cfg.backbone}, device={self.device})"

    @property
    def transform_key(self) -> tuple[str, int]:
        """Encoders with equal keys preprocess alike (the pretrained twin shares its personalized encoder's)."""
        return self.model_cfg.backbone, self.model_cfg.image_size

    def preprocess(self, images: Iterable[ImageLike]) -> torch.Tensor:
        """(N, 3, S, S) pixels of the eval transform, on the CPU (to embed with another encoder of the same key)."""
        return torch.stack([self.transform(open_image(image)) for image in images])

    @torch.inference_mode()
    def embed(self, images: Iterable[ImageLike] | torch.Tensor) -> np.ndarray:
        """(N, D) float32 unit embeddings of PIL images or photo paths (or :meth:`preprocess` output), in batches."""
        images = images if isinstance(images, torch.Tensor) else list(images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = batch if isinstance(batch, torch.Tensor) else self.preprocess(batch)
            embedded = self.encoder.embed(pixels.to(self.device), kind=self.model_cfg.eval_feature)
            chunks.append(embedded.float().cpu().numpy())
        dim = self.encoder.embed_dim(self.model_cfg.eval_feature)
        return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)

    def reference_images(self) -> list[Image.Image]:
        """The object's real train photos from the run's ingest table (as evaluation uses them)."""
        return load_reference_images(self.adapter_dir)

    @functools.cached_property
    def references(self) -> np.ndarray:
        """(k, D) embeddings of :meth:`reference_images`, computed once."""
        return self.embed(self.reference_images())

    def score(self, images: Iterable[ImageLike]) -> np.ndarray:
        """(N,) max cosine of each image to the object's real train photos (higher = more likely the object)."""
        return compute_scores(self.embed(images), self.references)

    def pretrained(self) -> PersonalEncoder:
        """The un-personalized twin: the same backbone and references, no adapter."""
        return PersonalEncoder(self.adapter_dir, pretrained=True, device=str(self.device), batch_size=self.batch_size)


def compute_scores(embeddings: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(N,) max cosine of ``embeddings`` (N, D) to ``references`` (k, D): evaluation's classification score."""
    from personalization.evaluation.classification import compute_instance_scores

    if len(embeddings) == 0:
        return np.zeros(0, np.float64)
    return compute_instance_scores(references, np.full(len(references), "object"), embeddings, "object")


def ingest_dir(adapter_dir: str | Path) -> Path:
    """``OUT/ingest`` of the run that trained ``adapter_dir`` (``OUT/train/<instance>``); falls back to the
    ``output_dir`` recorded in its config when the train folder was moved away from its run."""
    adapter_dir = Path(adapter_dir)
    beside = adapter_dir.parent.parent / "ingest"
    if (beside / "images.parquet").exists():
        return beside
    saved = yaml.safe_load((adapter_dir / RESOLVED_CONFIG).read_text()) or {}
    recorded = Path(str(saved.get("output_dir", ""))) / "ingest"
    if saved.get("output_dir") and (recorded / "images.parquet").exists():
        return recorded
    raise MissingInputError(
        f"{beside / 'images.parquet'} is missing: scoring compares with the object's own photos from the run's "
        f"ingest; keep {adapter_dir} inside its run folder (OUT/train/<instance>/ beside OUT/ingest/)"
    )


def load_reference_bytes(adapter_dir: str | Path) -> list[bytes]:
    """The stored image bytes (PNG) of the instance's real train photos, in ingest order."""
    from personalization.schema import read_image_table

    adapter_dir = Path(adapter_dir)
    images = ingest_dir(adapter_dir) / "images.parquet"
    table = read_image_table(images, columns=["image"], role="real_train", instance_id=adapter_dir.name)
    if table.num_rows == 0:
        raise UserError(f"{images}: no real_train photo of {adapter_dir.name!r} to compare with; re-run ingest")
    return table["image"].to_pylist()


def load_reference_images(adapter_dir: str | Path) -> list[Image.Image]:
    """The instance's real train photos as RGB images (what evaluation embeds as the object's gallery)."""
    from personalization.schema import decode_image

    return [decode_image(blob) for blob in load_reference_bytes(adapter_dir)]


def localize(
    adapter_dir: str | Path,
    images: Sequence[ImageLike],
    *,
    dense_size: int = 448,
    min_object_pixels: int = 100,
    max_side: int = 1024,
) -> list[DensePrediction | None]:
    """Where the object is in each image: evaluation's dense predictor (personalized patch features, the reference
    of the object's first masked train photo, Otsu mask, its box, confidence from the train box means).

    Each image is first downscaled to at most ``max_side`` px; the returned mask and box (x, y, w, h) are in those
    pixels, so divide by ``mask.shape`` for fractions. None where nothing is segmented or the image is unreadable.
    """
    from personalization.evaluation.dense import DensePrediction
    from personalization.evaluation.extract import FeatureExtractor
    from personalization.schema import decode_mask, encode_png, read_image_table

    adapter_dir = Path(adapter_dir)
    table = read_image_table(ingest_dir(adapter_dir) / "images.parquet", columns=["image", "mask"],
                             role="real_train", instance_id=adapter_dir.name)  # fmt: skip
    table = table.filter(table["mask"].is_valid())
    if table.num_rows == 0:
        raise UserError(
            f"find.localize: {adapter_dir.name!r} has no masked photo in its ingest table to take the object's "
            "reference from; re-run ingest with masks (or derived masks), or set find.localize=false"
        )
    extractor = FeatureExtractor(to_dict(read_model_config(adapter_dir)), str(adapter_dir), dense_size=dense_size)
    references, box_means = extractor.templates(table["image"].to_pylist(), table["mask"].to_pylist())
    templates = {"object": (references[0].astype(np.float64), box_means.astype(np.float64))}
    shrunk = {}
    for k, image in enumerate(images):
        try:
            image = open_image(image).convert("RGB")
        except (UserError, OSError):
            continue  # unreadable now (changed since it was ranked): no prediction
        image.thumbnail((max_side, max_side))
        shrunk[str(k)] = image
    pngs, sizes = [encode_png(im) for im in shrunk.values()], [(im.height, im.width) for im in shrunk.values()]
    found = extractor.predict(pngs, list(shrunk), sizes, templates, min_object_pixels)
    predictions: list[DensePrediction | None] = [None] * len(images)
    for k, image_id in enumerate(found["image_id"]):
        mask = decode_mask(found["mask"][k])
        box = tuple(float(v) for v in found["box"][k])
        predictions[int(image_id)] = DensePrediction(str(image_id), mask, box, float(found["score"][k]))
    return predictions


def load_encoder(
    path: str | os.PathLike, *, pretrained: bool = False, device: str = "", batch_size: int = 32
) -> PersonalEncoder:
    """The personalized encoder in ``path`` (``OUT/train/<instance>/``), or with ``pretrained=True`` its twin
    without the adapter. ``device`` defaults to CUDA when available. See the module docstring."""
    path = Path(path).expanduser()
    _check_adapter_dir(path)
    if not (path / "adapter_model.safetensors").is_file():
        raise MissingInputError(f"{path} has no adapter_model.safetensors; {EXPECTED}")
    return PersonalEncoder(path, pretrained=pretrained, device=device, batch_size=batch_size)


__all__ = ["PersonalEncoder", "compute_scores", "encoder_identity", "load_encoder", "localize"]
