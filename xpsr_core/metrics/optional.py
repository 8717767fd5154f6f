"""Perceptual and no-reference metrics that need weights: computed only when those are on disk.

Each metric in :data:`REGISTRY` checks its configured local weights path before anything is
loaded. A metric that cannot run is reported as ``{"computed": false, "reason": ...}`` and is
never given a value (no silent zeros). Nothing is ever downloaded.

* LPIPS (VGG, v0.1) is implemented here: it needs a folder with torchvision's VGG-16 ImageNet
  weights (``vgg16*.pth``, the ``torchvision.models.vgg16`` state dict; only its ``features.*``
  entries are used) and the LPIPS linear
  layers (``vgg.pth`` from the lpips package, keys ``lin0.model.1.weight`` ... ``lin4...``).
* DISTS, FID, MANIQA, MUSIQ and CLIPIQA run through pyiqa (``pyiqa.create_metric`` with
  ``pretrained_model_path``) when pyiqa is installed and the weights file exists; otherwise the
  reason says which of the two is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

FULL_REFERENCE, NO_REFERENCE, DISTRIBUTION = "full-reference", "no-reference", "distribution"


@dataclass
class MetricSpec:
    name: str
    kind: str
    higher_is_better: bool
    pyiqa_name: Optional[str] = None


SPECS = {
    "lpips": MetricSpec("lpips", FULL_REFERENCE, False),
    "dists": MetricSpec("dists", FULL_REFERENCE, False, "dists"),
    "fid": MetricSpec("fid", DISTRIBUTION, False, "fid"),
    "maniqa": MetricSpec("maniqa", NO_REFERENCE, True, "maniqa"),
    "musiq": MetricSpec("musiq", NO_REFERENCE, True, "musiq"),
    "clipiqa": MetricSpec("clipiqa", NO_REFERENCE, True, "clipiqa"),
}
OPTIONAL_METRICS = tuple(SPECS)


def _to_tensor(image: np.ndarray, device: str):
    import torch

    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].div(255.0).to(device)


class LPIPSVGG:
    """LPIPS v0.1 with the VGG-16 backbone, from local weight files."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2 .. relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, folder: Path, device: str = "cpu"):
        import torch
        import torchvision

        backbone = sorted(folder.glob("vgg16*.pth"))
        features = torchvision.models.vgg16(weights=None).features
        state = torch.load(backbone[0], map_location="cpu", weights_only=True)
        # the convolutional part is all LPIPS uses; the classifier weights (if present) are ignored
        features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        self.features = features[:30].eval().to(device).requires_grad_(False)
        lin_state = torch.load(folder / "vgg.pth", map_location="cpu", weights_only=True)
        self.lins = []
        for index, channels in enumerate(self.CHANNELS):
            weight = lin_state[f"lin{index}.model.1.weight"].float()
            if weight.shape != (1, channels, 1, 1):
                raise ValueError(f"lin{index} has shape {tuple(weight.shape)}, expected (1, {channels}, 1, 1)")
            self.lins.append(weight.to(device))
        self.shift = torch.tensor(self.SHIFT, device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor(self.SCALE, device=device).view(1, 3, 1, 1)
        self.device = device

    def _features(self, x):
        x = (x * 2 - 1 - self.shift) / self.scale
        outputs = []
        for start, stop in self.SLICES:
            for layer in self.features[start:stop]:
                x = layer(x)
            outputs.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return outputs

    def __call__(self, image: np.ndarray, reference: np.ndarray) -> float:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            a = self._features(_to_tensor(image, self.device))
            b = self._features(_to_tensor(reference, self.device))
            total = sum(F.conv2d((fa - fb) ** 2, lin).mean() for fa, fb, lin in zip(a, b, self.lins))
        return float(total)


class PyIQAMetric:
    def __init__(self, spec: MetricSpec, weights: Path, device: str = "cpu"):
        import pyiqa  # noqa: F401  (checked by availability)

        self.spec = spec
        self.metric = pyiqa.create_metric(spec.pyiqa_name, device=device, pretrained_model_path=str(weights))
        self.device = device

    def __call__(self, image: np.ndarray, reference: Optional[np.ndarray] = None) -> float:
        import torch

        with torch.inference_mode():
            if self.spec.kind == FULL_REFERENCE:
                return float(self.metric(_to_tensor(image, self.device), _to_tensor(reference, self.device)))
            return float(self.metric(_to_tensor(image, self.device)))

    def folders(self, sr_dir: Path, hr_dir: Path) -> float:
        return float(self.metric(str(sr_dir), str(hr_dir)))


def _pyiqa_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyiqa") is not None


def availability(name: str, path: Optional[str | Path]) -> Optional[str]:
    """None when ``name`` can run with the weights at ``path``; otherwise the reason it cannot."""
    spec = SPECS[name]
    if not path:
        return f"no weights path is configured for {name} (set evaluate.metric_weights.{name})"
    path = Path(path)
    if name == "lpips":
        if not path.is_dir():
            return f"the LPIPS weights folder {path} does not exist (it needs vgg16*.pth from torchvision and vgg.pth from lpips)"
        missing = [n for n, ok in (("vgg16*.pth", any(path.glob("vgg16*.pth"))), ("vgg.pth", (path / "vgg.pth").is_file())) if not ok]
        return f"{path} lacks {' and '.join(missing)}" if missing else None
    if not path.exists():
        return f"the {name} weights {path} do not exist locally (no downloads at run time)"
    if not _pyiqa_installed():
        return f"weights for {name} are at {path}, but the pyiqa package that implements {spec.pyiqa_name} is not installed"
    return None


def load_metric(name: str, path: str | Path, device: str = "cpu") -> Any:
    if name == "lpips":
        return LPIPSVGG(Path(path), device)
    return PyIQAMetric(SPECS[name], Path(path), device)


@dataclass
class MetricRun:
    """A loaded optional metric, or the reason it is not computed."""

    name: str
    metric: Any = None
    reason: Optional[str] = None

    @property
    def computed(self) -> bool:
        return self.metric is not None


def prepare_metrics(names: Sequence[str], paths: dict, device: str = "cpu") -> list[MetricRun]:
    runs = []
    for name in names:
        if name not in SPECS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(SPECS)}")
        reason = availability(name, paths.get(name))
        if reason is None:
            try:
                runs.append(MetricRun(name, load_metric(name, paths[name], device)))
                continue
            except Exception as error:  # a broken weights file is reported, not fatal
                reason = f"loading {name} from {paths[name]} failed: {type(error).__name__}: {error}"
        runs.append(MetricRun(name, reason=reason))
    return runs
