"""The memory budget of one model call (``--memory-budget``).

A method states what one item costs in a model call (``Method.call_cost``); the engine
puts no more items into one call than the budget allows, and an item that alone needs
more fails with a message naming the budget. A method can also refuse a configuration up
front whose smallest call cannot fit (WSSS: ``--samples`` rows of its largest image).
"""
from __future__ import annotations

import os
import re

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
AUTO_SHARE = 0.5        # of the device's memory a model call may take by default


def parse_budget(text: str | None) -> int | None:
    """"8GB", "512MiB", "1.5g" -> bytes (powers of 1024); "none" -> None (no limit);
    "auto"/None -> left to ``auto_budget``."""
    if text is None or text.strip().lower() == "auto":
        return None
    t = text.strip().lower()
    if t in ("none", "0", "off"):
        return 0
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--memory-budget {text!r}: use a size such as 8GB or 512MB, 'auto' or 'none'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def auto_budget(device: str) -> int:
    """Half of the device's memory: the CUDA device's total, or this machine's RAM."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * AUTO_SHARE)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * AUTO_SHARE)


def resolve_budget(text: str | None, device: str) -> int | None:
    """Bytes per model call, or None for no limit."""
    value = parse_budget(text)
    if value == 0:
        return None
    return auto_budget(device) if value is None else value


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
