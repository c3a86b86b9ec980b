"""Edge maps of the query for the spatial control module (DIFFSEG.md §6; O2, O11).

The paper feeds HED edges [38] to SCM. No HED weights ship with any package, so:

- ``canny`` (default): ``cv2.Canny(gray, 100, 200)`` on the query squashed to R²
  (controlnet_aux's CannyDetector defaults). Needs no weights; departs from the paper.
- ``hed FILE``: text2mask's own module of the ControlNetHED architecture (the Apache-2.0
  "ControlNetHED_Apache2" of ControlNet's annotator: five VGG-style stages with 1×1
  side outputs; edge = sigmoid of the mean of the side outputs upsampled to the input
  size), loading the user's ``ControlNetHED.pth`` with ``weights_only=True``. The side
  outputs are upsampled with bilinear interpolation (half-pixel centres, as cv2's
  INTER_LINEAR that the annotator uses).

Every detector returns uint8 (R, R) maps (0..255) and names itself with a digest, so a
checkpoint records which edges it was trained on and evaluation refuses another.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError, ModelLoadError

DETECTORS = ("canny", "hed")
CANNY_LOW, CANNY_HIGH = 100, 200
# (input channels, output channels, convolutions) of the five ControlNetHED stages.
HED_STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


def canny(rgb: np.ndarray) -> np.ndarray:
    """(R, R) uint8 {0, 255} Canny edges of an (R, R, 3) uint8 RGB photo."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(gray, CANNY_LOW, CANNY_HIGH)


class _HEDStage(torch.nn.Module):
    def __init__(self, cin: int, cout: int, convs: int):
        super().__init__()
        self.convs = torch.nn.Sequential(*[torch.nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1)
                                           for i in range(convs)])
        self.projection = torch.nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(torch.nn.Module):
    """The ControlNetHED network; its parameter names are those of ``ControlNetHED.pth``
    (``norm``, ``block{1..5}.convs.{j}``, ``block{1..5}.projection``)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, n) in enumerate(HED_STAGES, start=1):
            setattr(self, f"block{i}", _HEDStage(cin, cout, n))

    def forward(self, rgb255: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in 0..255 -> (N, H, W) edge probability in [0, 1]."""
        x = rgb255 - self.norm
        sides = []
        for i in range(1, len(HED_STAGES) + 1):
            x, side = getattr(self, f"block{i}")(x, pool=i > 1)
            sides.append(F.interpolate(side, size=rgb255.shape[-2:], mode="bilinear", align_corners=False))
        return torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1))


def load_hed(path: str | Path, device="cpu") -> HED:
    """The user's ControlNetHED weights (a state dict; read with weights_only=True)."""
    path = Path(path).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"--hed {path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a foreign file
        raise ModelLoadError(f"--hed {path}: not a weights file torch can read safely ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    net = HED()
    if not isinstance(state, dict):
        raise ModelLoadError(f"--hed {path}: expected a state dict, got {type(state).__name__}")
    want = net.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(want[k].shape))
    if missing or extra or wrong:
        raise ModelLoadError(f"--hed {path}: not ControlNetHED weights (missing {missing[:3]}, unexpected {extra[:3]}, "
                             f"wrong shape {wrong[:3]})")
    if not all(torch.isfinite(state[k].float()).all() for k in want):
        raise ModelLoadError(f"--hed {path}: holds non-finite weights")
    net.load_state_dict({k: state[k].float() for k in want})
    return net.to(device).eval().requires_grad_(False)


class EdgeDetector:
    """``detector(rgb_uint8)`` -> (R, R) uint8 edge map; ``describe()`` for fewshot.json."""

    def __init__(self, name: str = "canny", hed_file: str | Path | None = None, device="cpu"):
        if name not in DETECTORS:
            raise ConfigError(f"unknown --edges {name!r}; use one of {', '.join(DETECTORS)}")
        if (name == "hed") != (hed_file is not None):
            raise ConfigError("--edges hed needs --hed FILE (ControlNetHED.pth), and --hed only goes with --edges hed")
        self.name, self.file, self.sha256 = name, None, None
        self._hed = None
        if name == "hed":
            from ...modeling.loading import file_digest

            self.file = str(Path(hed_file).expanduser().resolve())
            self._hed = load_hed(self.file, device)
            self.sha256 = file_digest(Path(self.file))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self._hed is None:
            return canny(rgb)
        p = next(self._hed.parameters())
        x = torch.from_numpy(np.ascontiguousarray(rgb, np.uint8)).permute(2, 0, 1)[None].to(p.device, p.dtype)
        with torch.no_grad():
            edge = self._hed(x)[0]
        return (edge * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()

    def describe(self) -> dict:
        return {"detector": self.name, "file": self.file, "sha256": self.sha256}
