"""The one device rule every library worker follows: the device asked for, else CUDA when visible, else CPU."""

import torch

from personalization.devices import pick_device


def test_an_asked_device_is_kept_and_the_default_follows_cuda():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # naming a device never needs one
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == pick_device("").type == pick_device(None).type == expected
