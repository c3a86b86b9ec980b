"""``--dtype auto`` is fp32 on every device (the official evaluations of all four methods
run fp32), and the bf16 hint of a CPU with native bf16 is logged once per process."""
from __future__ import annotations

import logging

import pytest
import torch

from text2mask.modeling import loading


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
@pytest.mark.parametrize("given", [None, "", "auto"])
def test_auto_is_fp32_everywhere(device, given):
    # a torch.device is only a name here: the rule is checked for CUDA on a CUDA-less machine
    assert loading.resolve_dtype(given, torch.device(device)) is torch.float32


@pytest.mark.parametrize("given, want", [("fp16", torch.float16), ("float16", torch.float16),
                                         ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_explicit_dtypes_are_kept(given, want):
    assert loading.resolve_dtype(given, torch.device("cuda")) is want


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        loading.resolve_dtype("half", torch.device("cpu"))


def test_the_bf16_hint_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(loading, "_BF16_HINTED", False)
    with caplog.at_level(logging.INFO, logger="text2mask"):
        for _ in range(3):
            assert loading.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert sum("computes bf16 natively" in r.getMessage() for r in caplog.records) == 1
