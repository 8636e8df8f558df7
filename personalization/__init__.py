"""Personalized representations from personalized generation: the library (no Ray, nothing runs at import).

``from personalization import load_encoder`` loads a trained encoder (see :mod:`personalization.personal_encoder`);
it is imported on first use, so ``import personalization`` stays free of torch.
"""

__version__ = "0.1.0"
__all__ = ["PersonalEncoder", "load_encoder"]


def __getattr__(name: str):
    if name in __all__:
        from personalization import personal_encoder

        return getattr(personal_encoder, name)
    raise AttributeError(f"module 'personalization' has no attribute {name!r}")
