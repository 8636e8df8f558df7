"""Shared inputs of the reliability suite: the tiny model zoo and a one-category toy benchmark, built once."""

import pytest


@pytest.fixture(scope="session")
def zoo(tiny_zoo):
    """Tiny random DINOv2 and Stable Diffusion, saved in their real layouts (absolute paths)."""
    return tiny_zoo(["dinov2", "stable_diffusion"])


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A PODS-layout toy dataset: one category, one val + one test instance, 48 px."""
    from personalization.datasets import make_toy

    return make_toy(
        tmp_path_factory.mktemp("toy") / "toy",
        categories=["mug"],
        val_per_category=1,
        test_per_category=1,
        test_per_split=1,
        dense_per_instance=1,
        size=48,
    )
