"""The paper's metrics as the authors computed them (pyiqa), and our own PSNR/SSIM on Y, in one table.

The authors' ``test.py`` builds every metric with ``pyiqa.create_metric(NAME, device=device)`` and the
default options; so does :func:`prepare_metrics`. PSNR and SSIM get the BT.601 Y channel that their
``rgb2ycbcr_pt`` computes (RGB in [0, 1], float32 arithmetic, then float64, 1-channel tensors);
LPIPS and DISTS get (SR, HR), the no-reference metrics the SR image, as the float32 RGB tensors in
[0, 1] that pyiqa reads from an 8-bit RGB file; FID compares the HR folder with the SR folder.
``crop_border`` crops PSNR/SSIM (pyiqa's and ours); the authors crop nothing.

pyiqa version: 0.1.16 (the ``metrics`` extra pins it, with setuptools < 82: openai-clip, CLIPIQA's
tokenizer, imports ``pkg_resources``, which setuptools 82 removed). The authors pinned 0.1.10, which
cannot run with this stack: its ``import pyiqa`` fails, because it imports imgaug, which uses
``np.sctypes`` (removed in NumPy 2.0), and opencv-python 5, which pyiqa 0.1.10 pulls in unpinned,
requires NumPy >= 2 (as does the torch 2.14 environment here). pyiqa 0.1.16 requires
transformers >= 5, as this project has.

What changed between 0.1.10 and 0.1.16 for these metrics (both sources compared):

* MANIQA: 0.1.10 averaged 20 *random* 224 x 224 crops (NumPy's global generator, reseeded to 123
  each time any metric was created, so the crops depended on everything run in between); 0.1.16
  averages 20 crops on a fixed grid (4 rows x 5 columns). The numbers differ by crop sampling and
  are now reproducible.
* NIQE: 0.1.10 cast the pristine model (mean, covariance) to float32 before the float64
  computation; 0.1.16 keeps float64 (rounding-level differences).
* PSNR, SSIM, LPIPS, DISTS, MUSIQ, CLIPIQA: the same computation (LPIPS and DISTS only return a
  differently squeezed tensor). FID ('clean' mode): the same; files are listed sorted and fed in
  batches of 8 instead of 32, which leaves the statistics unchanged up to float rounding.
* Weights: the same file names, downloaded by 0.1.16 from the Hugging Face mirror
  ``chaofengc/IQA-PyTorch-Weights`` instead of GitHub releases (MANIQA's from IIGROUP/MANIQA).

Our ``psnr_y``/``ssim_y`` (``fidelity.py``, basicsr's definitions) against the authors' pyiqa
``psnr``/``ssim`` on the same Y: pyiqa adds 1e-8 to the MSE (Y in [0, 1]), so its PSNR is lower by
``10 log10(1 + 1e-8 / MSE)`` (2e-4 dB at 36 dB); pyiqa's SSIM rounds Y x 255 to integers first (as
MATLAB does on uint8) and clamps the contrast-structure term at 0, which moved it by 3e-5 to 1.4e-3
(mostly down) on the JPEG-compressed, blurred, noisy and bicubic-upscaled photographs we compared.

Weights: every file comes from one flat folder (``weights_dir``; the evaluate stage's
``metric_weights_dir``, default ``models/metrics``), under the name pyiqa, torchvision or CLIP would
download it as. Nothing is downloaded: a missing file makes the metric "not computed" with the
file's name and source, and while a metric is created every download function refuses
(:func:`local_weights_only`). The files:

=======  =====================================  ====================================================  ===========
metric   file                                   what it is                                            source
=======  =====================================  ====================================================  ===========
lpips    LPIPS_v0.1_alex-df73285e.pth           LPIPS v0.1 linear layers on AlexNet features          pyiqa
lpips    alexnet-owt-7be5be79.pth               torchvision's AlexNet ImageNet weights (backbone)     torchvision
dists    DISTS_weights-f5e65c96.pth             DISTS alpha/beta weights                              pyiqa
dists    vgg16-397923af.pth                     torchvision's VGG-16 ImageNet weights (backbone)      torchvision
fid      pt_inception-2015-12-05-6726825d.pth   FID Inception-v3 (TensorFlow's weights, ported)       pyiqa
maniqa   ckpt_koniq10k.pt                       MANIQA trained on KonIQ-10k, ViT-B/8 backbone inside  pyiqa
clipiqa  RN50.pt                                OpenAI's CLIP ResNet-50 (pyiqa checks its SHA-256)    CLIP
musiq    musiq_koniq_ckpt-e95806b9.pth          MUSIQ trained on KonIQ-10k                            pyiqa
niqe     niqe_modelparameters.mat               NIQE's pristine model (mu_prisparam, cov_prisparam)   pyiqa
=======  =====================================  ====================================================  ===========

Where pyiqa 0.1.16 would download them from: pyiqa
``https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/<file>``, torchvision
``https://download.pytorch.org/models/<file>``, CLIP
https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt

psnr, ssim, psnr_y and ssim_y need no files. MANIQA's timm ViT-B/8 ImageNet weights are not needed:
pyiqa loads the MANIQA checkpoint strictly over the whole model, backbone included, so the backbone
is built without them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from unittest import mock

import huggingface_hub.constants
import numpy as np
import torch
import torch.hub

from xpsr_core.errors import UserError

from .fidelity import psnr_y, ssim_y

FULL_REFERENCE, NO_REFERENCE, DISTRIBUTION = "full-reference", "no-reference", "distribution"
PYIQA_VERSION = "0.1.16"
PYIQA_MISSING = "pyiqa is not installed (pip install -e '.[metrics]')"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

_PYIQA_WEIGHTS = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
_TORCHVISION_WEIGHTS = "https://download.pytorch.org/models/"
_CLIP_RN50 = ("https://openaipublic.azureedge.net/clip/models/"
              "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")


@dataclass(frozen=True)
class WeightFile:
    """One file a metric loads: its name in the weights folder, what it is, and where it is published."""

    file_name: str
    description: str
    url: str


def _pyiqa_file(file_name: str, description: str) -> WeightFile:
    return WeightFile(file_name, description, _PYIQA_WEIGHTS + file_name)


def _torchvision_file(file_name: str, description: str) -> WeightFile:
    return WeightFile(file_name, description, _TORCHVISION_WEIGHTS + file_name)


@dataclass(frozen=True)
class MetricSpec:
    """A metric of the evaluation table; ``pyiqa_name`` is None for the ones computed here."""

    name: str
    label: str
    kind: str
    higher_is_better: bool
    weight_files: tuple[WeightFile, ...] = ()
    pyiqa_name: Optional[str] = None


def _pyiqa_spec(name: str, label: str, kind: str, higher_is_better: bool, *weight_files: WeightFile) -> MetricSpec:
    return MetricSpec(name, label, kind, higher_is_better, weight_files, pyiqa_name=name)


METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    _pyiqa_spec("psnr", "PSNR", FULL_REFERENCE, True),
    _pyiqa_spec("ssim", "SSIM", FULL_REFERENCE, True),
    _pyiqa_spec("lpips", "LPIPS", FULL_REFERENCE, False,
                _pyiqa_file("LPIPS_v0.1_alex-df73285e.pth", "pyiqa's LPIPS v0.1 linear layers for AlexNet"),
                _torchvision_file("alexnet-owt-7be5be79.pth", "torchvision's AlexNet ImageNet weights, the backbone")),
    _pyiqa_spec("dists", "DISTS", FULL_REFERENCE, False,
                _pyiqa_file("DISTS_weights-f5e65c96.pth", "pyiqa's DISTS alpha/beta weights"),
                _torchvision_file("vgg16-397923af.pth", "torchvision's VGG-16 ImageNet weights, the backbone")),
    _pyiqa_spec("fid", "FID", DISTRIBUTION, False,
                _pyiqa_file("pt_inception-2015-12-05-6726825d.pth", "the FID Inception-v3 weights")),
    _pyiqa_spec("maniqa", "MANIQA", NO_REFERENCE, True,
                _pyiqa_file("ckpt_koniq10k.pt", "the MANIQA checkpoint trained on KonIQ-10k")),
    _pyiqa_spec("clipiqa", "CLIPIQA", NO_REFERENCE, True,
                WeightFile("RN50.pt", "OpenAI's CLIP ResNet-50, checked by its SHA-256", _CLIP_RN50)),
    _pyiqa_spec("musiq", "MUSIQ", NO_REFERENCE, True,
                _pyiqa_file("musiq_koniq_ckpt-e95806b9.pth", "the MUSIQ checkpoint trained on KonIQ-10k")),
    _pyiqa_spec("niqe", "NIQE", NO_REFERENCE, False,
                _pyiqa_file("niqe_modelparameters.mat", "NIQE's pristine model: mu_prisparam, cov_prisparam")),
    MetricSpec("psnr_y", "PSNR-Y (ours)", FULL_REFERENCE, True),
    MetricSpec("ssim_y", "SSIM-Y (ours)", FULL_REFERENCE, True),
)}
TABLE1_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "dists", "fid", "maniqa", "clipiqa", "musiq")
AUTHORS_METRICS: tuple[str, ...] = (*TABLE1_METRICS, "niqe")
_CROPPED_METRICS = {"psnr", "ssim", "psnr_y", "ssim_y"}


class WeightDownloadBlocked(UserError):
    """A library tried to download a file while a metric was being created from local weights."""


@contextlib.contextmanager
def local_weights_only(weights_dir: Optional[Path]) -> Iterator[None]:
    """Within the block, pyiqa, torchvision and CLIP read their files from ``weights_dir`` and cannot download.

    pyiqa's cache (``DEFAULT_CACHE_DIR``, read at call time) is the folder itself; torch hub's
    ``checkpoints/`` (torchvision) and ``clip/`` are links to it from a temporary hub folder, so the
    folder stays flat. The download functions raise :class:`WeightDownloadBlocked` and the Hugging
    Face hub is offline. Everything is restored on exit. It patches modules, so use it from one thread.
    """
    import pyiqa.archs.clip_model
    import pyiqa.utils.download_util

    with tempfile.TemporaryDirectory(prefix="xpsr-metric-hub-") as hub:
        source = Path(hub) / "no-weights-folder"  # an absent folder is never created
        if weights_dir is not None and Path(weights_dir).is_dir():
            source = Path(weights_dir).resolve()
        source.mkdir(exist_ok=True)
        for cache in ("checkpoints", "clip"):
            (Path(hub) / cache).symlink_to(source, target_is_directory=True)

        folder = weights_dir if weights_dir is not None else "the metric weights folder (none is set)"

        def refuse_download(url, *args, **kwargs):
            url = getattr(url, "full_url", url)  # urlopen also takes Request objects
            raise WeightDownloadBlocked(f"{url} would be downloaded, but metric weights only come from {folder}: "
                                        f"put the file {os.path.basename(str(url))} there")

        with contextlib.ExitStack() as patches:
            for patch in (
                mock.patch.object(torch.hub, "get_dir", lambda: hub),
                mock.patch.object(pyiqa.archs.clip_model, "get_dir", lambda: hub),  # bound by name at import
                mock.patch.object(pyiqa.utils.download_util, "DEFAULT_CACHE_DIR", str(source)),
                mock.patch.object(torch.hub, "download_url_to_file", refuse_download),
                mock.patch.object(pyiqa.utils.download_util, "download_url_to_file", refuse_download),
                mock.patch("urllib.request.urlopen", refuse_download),  # CLIP's own downloader
                mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),  # read at import otherwise
                mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}),
            ):
                patches.enter_context(patch)
            yield


@contextlib.contextmanager
def _timm_backbones_unpretrained() -> Iterator[None]:
    """MANIQA's checkpoint replaces every backbone weight (strict load), so timm need not fetch ImageNet weights."""
    import timm  # not a dependency of ours: it comes with pyiqa's MANIQA

    create_model = timm.create_model

    def create_unpretrained(*args, **kwargs):
        return create_model(*args, **{**kwargs, "pretrained": False})

    with mock.patch.object(timm, "create_model", create_unpretrained):
        yield


def missing_weights(spec: MetricSpec, weights_dir: Optional[Path]) -> Optional[str]:
    """None when every file ``spec`` needs is in ``weights_dir``; otherwise one line naming what is missing."""
    if not spec.weight_files:
        return None
    if weights_dir is None:
        names = ", ".join(file.file_name for file in spec.weight_files)
        return f"no metric weights folder is set (set metric_weights_dir to a folder holding {names})"
    missing = [file for file in spec.weight_files if not (Path(weights_dir) / file.file_name).is_file()]
    return "; ".join(f"{Path(weights_dir) / file.file_name} is missing ({file.description}; "
                     f"put the file published at {file.url} there)" for file in missing) or None


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _import_pyiqa():
    """The pyiqa module and None, or None and the reason it cannot be used."""
    try:
        import pyiqa
    except ImportError:
        return None, PYIQA_MISSING
    except Exception as error:  # installed but broken, e.g. built against another NumPy
        return None, f"importing pyiqa failed: {_one_line(error)}"
    installed = getattr(pyiqa, "__version__", "of unknown version")
    if installed != PYIQA_VERSION:  # the file table and the download hooks here are this version's
        return None, f"pyiqa {installed} is installed; these metrics need {PYIQA_VERSION} (pip install -e '.[metrics]')"
    return pyiqa, None


def _authors_y(image: np.ndarray):
    """(1, 1, H, W) float64 Y in [16/255, 235/255], computed as the authors' ``rgb2ycbcr_pt(..., y_only=True)``."""
    rgb = torch.from_numpy((np.asarray(image) / 255.0).astype(np.float32)).permute(2, 0, 1)[None]
    weights = torch.tensor([[65.481], [128.553], [24.966]])
    y = (torch.matmul(rgb.permute(0, 2, 3, 1), weights).permute(0, 3, 1, 2) + 16.0) / 255.0
    return y.to(torch.float64)


def _rgb_tensor(image: np.ndarray):
    """(1, 3, H, W) float32 in [0, 1]: what pyiqa reads from an 8-bit RGB image file."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].div(255.0)


def _pyiqa_scorer(pyiqa, spec: MetricSpec, weights_dir: Optional[Path], device: str, crop_border: int) -> Callable:
    options = {"crop_border": crop_border} if spec.name in _CROPPED_METRICS else {}
    backbones = _timm_backbones_unpretrained() if spec.name == "maniqa" else contextlib.nullcontext()
    with local_weights_only(weights_dir), backbones:
        metric = pyiqa.create_metric(spec.pyiqa_name, device=device, **options)

    if spec.kind == DISTRIBUTION:
        def score_folders(sr_dir: Path, hr_dir: Path) -> float:
            # the authors' order (HR folder first); in-process decoding, no worker processes
            return float(metric(str(hr_dir), str(sr_dir), num_workers=0, verbose=False))

        return score_folders
    to_tensor = _authors_y if spec.name in ("psnr", "ssim") else _rgb_tensor

    def score(sr: np.ndarray, hr: Optional[np.ndarray]) -> float:
        if spec.kind == FULL_REFERENCE:
            return float(metric(to_tensor(sr), to_tensor(hr)).item())
        return float(metric(to_tensor(sr)).item())

    return score


def _fidelity_scorer(name: str, crop_border: int) -> Callable:
    function = psnr_y if name == "psnr_y" else ssim_y
    return lambda sr, hr: function(sr, hr, crop_border)


def _check_image(image: np.ndarray, role: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the {role} image must be an H x W x 3 uint8 RGB array, got {image.dtype} {image.shape}")
    return image


def _count_images(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file())


class MetricRun:
    """One metric ready to score, or the reason it is not computed (it then has no values, never 0)."""

    def __init__(self, spec: MetricSpec, *, scorer: Optional[Callable] = None, reason: Optional[str] = None):
        if (scorer is None) == (reason is None):
            raise ValueError("a MetricRun has either a scorer or the reason it has none")
        self.spec, self.reason, self._scorer = spec, reason, scorer

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def computed(self) -> bool:
        return self.reason is None

    def status_line(self) -> str:
        return f"{self.name}: computed" if self.computed else f"{self.name}: not computed: {self.reason}"

    def __repr__(self) -> str:
        return f"MetricRun({self.status_line()!r})"

    def _require(self, distribution: bool) -> None:
        if not self.computed:
            raise RuntimeError(f"{self.name} cannot score: it is not computed ({self.reason})")
        if distribution != (self.spec.kind == DISTRIBUTION):
            call = "score_folders(sr_dir, hr_dir)" if self.spec.kind == DISTRIBUTION else "score(sr, hr)"
            raise ValueError(f"{self.name} is a {self.spec.kind} metric: call {call}")

    def score(self, sr: np.ndarray, hr: Optional[np.ndarray] = None) -> float:
        """The metric of one SR image (H x W x 3 uint8 RGB); full-reference metrics also need the HR image."""
        self._require(distribution=False)
        sr = _check_image(sr, "SR")
        if self.spec.kind == FULL_REFERENCE:
            if hr is None:
                raise ValueError(f"{self.name} is full-reference: pass the HR image too")
            hr = _check_image(hr, "HR")
            if sr.shape != hr.shape:
                raise UserError(f"{self.name}: the SR image is {sr.shape[1]}x{sr.shape[0]} but its HR image is "
                                f"{hr.shape[1]}x{hr.shape[0]}; SR images must have the HR size (scale x LR).")
        return self._scorer(sr, hr)

    def score_folders(self, sr_dir: Path, hr_dir: Path) -> float:
        """A distribution metric (FID) between a folder of SR images and a folder of HR images."""
        self._require(distribution=True)
        for role, folder in (("SR", Path(sr_dir)), ("HR", Path(hr_dir))):
            if not folder.is_dir():
                raise UserError(f"{self.name}: the {role} folder {folder} does not exist.")
            count = _count_images(folder)
            if count < 2:
                raise UserError(f"{self.name}: the {role} folder {folder} holds {count} image(s); "
                                "a covariance needs at least 2 per folder.")
        return self._scorer(Path(sr_dir), Path(hr_dir))


def prepare_metrics(names: Sequence[str], weights_dir: Optional[Path], device: str = "cpu",
                    crop_border: int = 0) -> list[MetricRun]:
    """A :class:`MetricRun` per name, in order: created from ``weights_dir``, or not computed with the reason.

    ``crop_border`` pixels are cropped from every edge for psnr, ssim, psnr_y and ssim_y. Unknown or
    repeated names raise :class:`UserError`; a missing file, a missing pyiqa or a file that fails to
    load only makes that metric not computed.
    """
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UserError(f"Unknown metrics {unknown}; choose from {', '.join(METRICS)}.")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise UserError(f"Metrics {repeated} are listed more than once; list each metric once.")
    if crop_border < 0:
        raise UserError(f"crop_border must be 0 or more pixels, got {crop_border}.")
    weights_dir = Path(weights_dir) if weights_dir is not None else None
    pyiqa, pyiqa_problem = _import_pyiqa() if any(METRICS[name].pyiqa_name for name in names) else (None, None)
    runs = []
    for name in names:
        spec = METRICS[name]
        if spec.pyiqa_name is None:
            runs.append(MetricRun(spec, scorer=_fidelity_scorer(name, crop_border)))
            continue
        reason = pyiqa_problem or missing_weights(spec, weights_dir)
        if reason is None:
            try:
                runs.append(MetricRun(spec, scorer=_pyiqa_scorer(pyiqa, spec, weights_dir, device, crop_border)))
                continue
            except Exception as error:  # a corrupt or mismatched weight file is reported, not fatal
                reason = f"creating it from {weights_dir} failed: {_one_line(error)}"
        runs.append(MetricRun(spec, reason=reason))
    return runs
