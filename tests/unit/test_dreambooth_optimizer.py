"""8-bit Adam for DreamBooth: asked for without bitsandbytes, it fails before any work, naming the fix."""

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import torch

from personalization.config import ConfigError, load_config
from personalization.errors import UserError
from personalization.synthesis.dreambooth import _optimizer
from personalization.synthesis.saved_generator import DreamboothError

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_no_bnb = pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed here")


@needs_no_bnb
def test_config_asking_for_8bit_adam_without_bitsandbytes_is_a_user_error():
    with pytest.raises(ConfigError, match=r"dreambooth\.use_8bit_adam: .*pip install -e '\.\[gpu\]'") as caught:
        load_config(overrides=["dreambooth.enabled=true", "dreambooth.use_8bit_adam=true"])
    assert isinstance(caught.value, UserError)
    assert "dreambooth.use_8bit_adam=false" in str(caught.value)


@needs_no_bnb
def test_optimizer_never_falls_back_quietly():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(DreamboothError, match=r"bitsandbytes==0\.50\.2.*use_8bit_adam=false"):
        _optimizer(params, 1e-4, use_8bit_adam=True, device=torch.device("cpu"))


def test_default_runs_here_with_torch_adamw():
    cfg = load_config(overrides=["dreambooth.enabled=true"])
    assert cfg.dreambooth.use_8bit_adam is False
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = _optimizer(params, 1e-4, cfg.dreambooth.use_8bit_adam, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == 1e-4


@needs_no_bnb
def test_the_fix_named_is_the_pinned_gpu_extra():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    (pin,) = pyproject["project"]["optional-dependencies"]["gpu"]
    assert pin.startswith("bitsandbytes==")
    with pytest.raises(ConfigError, match=re.escape(pin)):
        load_config(overrides=["dreambooth.use_8bit_adam=true"])
