"""Metrics: our Y PSNR/SSIM against basicsr and the authors' pyiqa ones, pyiqa metrics from local files only."""

from __future__ import annotations

import io
import math
import re
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import xpsr_core.degrade.compat  # noqa: F401  (the torchvision alias basicsr 1.4.2 needs, before basicsr)
from conftest import photo
from xpsr_core.errors import UserError
from xpsr_core.metrics import (
    AUTHORS_METRICS,
    METRICS,
    PYIQA_MISSING,
    TABLE1_METRICS,
    WeightDownloadBlocked,
    local_weights_only,
    prepare_metrics,
    psnr_y,
    rgb_to_y,
    ssim_y,
)

LPIPS_CHANNELS = (64, 192, 384, 256, 256)  # AlexNet's relu1..relu5


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _photo_pairs(size: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    """(SR, HR) pairs of real photographs: JPEG-compressed, blurred, and bicubic x4 down and up."""
    astronaut, coffee, chelsea = (photo(name, (size, size)) for name in ("astronaut", "coffee", "chelsea"))
    blurred = np.asarray(Image.fromarray(coffee).filter(ImageFilter.GaussianBlur(1.5)))
    small = Image.fromarray(chelsea).resize((size // 4, size // 4), Image.BICUBIC)
    upscaled = np.asarray(small.resize((size, size), Image.BICUBIC))
    return [(_jpeg(astronaut, 30), astronaut), (blurred, coffee), (upscaled, chelsea)]


def _crop(array: np.ndarray, border: int) -> np.ndarray:
    return array[border:-border, border:-border] if border else array


def _forbid_downloads(monkeypatch) -> None:
    import pyiqa.utils.download_util

    def fail(url, *args, **kwargs):
        pytest.fail(f"a download was attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    monkeypatch.setattr(pyiqa.utils.download_util, "download_url_to_file", fail)
    monkeypatch.setattr(urllib.request, "urlopen", fail)


def _backbone_state(model: torch.nn.Module, generator: torch.Generator) -> dict:
    """Random convolution weights; the classifier (unused by LPIPS and DISTS) as zero-stride tensors: small files."""
    return {key: torch.randn(value.shape, generator=generator) * 0.05 if key.startswith("features.")
            else torch.zeros((), dtype=value.dtype).expand(value.shape)
            for key, value in model.state_dict().items()}


def _basicsr_metrics():
    from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim  # after compat (module level)

    return calculate_psnr, calculate_ssim


@pytest.mark.parametrize("shape,crop", [((64, 64, 3), 4), ((67, 53, 3), 2), ((40, 96, 3), 0)])
def test_psnr_ssim_y_equal_basicsr(shape, crop):
    calculate_psnr, calculate_ssim = _basicsr_metrics()
    reference = photo("astronaut", (shape[1], shape[0]))
    rng = np.random.default_rng(shape[0])
    degraded = np.clip(reference.astype(np.int16) + rng.integers(-25, 26, reference.shape), 0, 255).astype(np.uint8)
    # basicsr reads images with OpenCV (BGR); ours are RGB, so basicsr gets the channel-reversed arrays
    expected_psnr = calculate_psnr(degraded[..., ::-1], reference[..., ::-1], crop, test_y_channel=True)
    expected_ssim = calculate_ssim(degraded[..., ::-1], reference[..., ::-1], crop, test_y_channel=True)
    assert psnr_y(degraded, reference, crop) == pytest.approx(expected_psnr, abs=1e-6)
    assert ssim_y(degraded, reference, crop) == pytest.approx(expected_ssim, abs=1e-6)
    assert psnr_y(reference, reference, crop) == calculate_psnr(reference, reference, crop, test_y_channel=True)
    assert psnr_y(reference, reference, crop) == float("inf")
    assert ssim_y(reference, reference, crop) == pytest.approx(1.0, abs=1e-9)


def _window_ssim(a: np.ndarray, b: np.ndarray, clamp_contrast_structure: bool) -> float:
    """SSIM with an 11 x 11 Gaussian window (sigma 1.5) over the valid region, L = 255 (scipy's filter)."""
    from scipy.ndimage import gaussian_filter

    def mean(x):  # truncate 3.5 gives the 11-tap window; the 5-pixel margin is where it would leave the image
        return gaussian_filter(x, sigma=1.5, truncate=3.5)[5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = mean(a), mean(b)
    contrast_structure = (2 * (mean(a * b) - mu_a * mu_b) + c2) / (mean(a * a) - mu_a**2 + mean(b * b) - mu_b**2 + c2)
    if clamp_contrast_structure:
        contrast_structure = np.maximum(contrast_structure, 0)
    return float(((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1) * contrast_structure).mean())


@pytest.mark.parametrize("crop_border", [0, 4])
def test_authors_psnr_ssim_differ_from_ours_only_as_documented(crop_border):
    """pyiqa's PSNR adds 1e-8 to the MSE; its SSIM is the same SSIM on Y rounded to integers, clamped at 0."""
    psnr, ssim, ours_psnr, ours_ssim = prepare_metrics(["psnr", "ssim", "psnr_y", "ssim_y"], None,
                                                       crop_border=crop_border)
    for sr, hr in _photo_pairs():
        ours = ours_psnr.score(sr, hr)
        assert ours == psnr_y(sr, hr, crop_border)
        mse = 10 ** (-ours / 10)  # of Y in [0, 1]
        assert psnr.score(sr, hr) == pytest.approx(ours - 10 * math.log10(1 + 1e-8 / mse), abs=1e-5)

        y_sr, y_hr = (_crop(rgb_to_y(image).astype(np.float64), crop_border) for image in (sr, hr))
        assert ours_ssim.score(sr, hr) == pytest.approx(_window_ssim(y_sr, y_hr, False), abs=1e-9)
        expected = _window_ssim(np.round(y_sr), np.round(y_hr), True)
        assert ssim.score(sr, hr) == pytest.approx(expected, abs=1e-6)
        assert abs(ours_ssim.score(sr, hr) - ssim.score(sr, hr)) < 2e-3


def test_table_names_the_files_pyiqa_would_download():
    from pyiqa.archs import dists_arch, inception, lpips_arch, maniqa_arch, musiq_arch, niqe_arch
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    published = {
        "lpips": [lpips_arch.default_model_urls["0.1_alex"], AlexNet_Weights.IMAGENET1K_V1.url],
        "dists": [dists_arch.default_model_urls["url"], VGG16_Weights.IMAGENET1K_V1.url],
        "fid": [inception.FID_WEIGHTS_URL],
        "maniqa": [maniqa_arch.default_model_urls["koniq"]],
        "musiq": [musiq_arch.default_model_urls["koniq10k"]],
        "niqe": [niqe_arch.default_model_urls["url"]],
    }  # clipiqa's URL is checked where CLIP's loader tries to fetch it
    for name, urls in published.items():
        assert [file.url for file in METRICS[name].weight_files] == urls
    for spec in METRICS.values():
        assert all(file.url.rsplit("/", 1)[-1] == file.file_name for file in spec.weight_files)
    assert TABLE1_METRICS == ("psnr", "ssim", "lpips", "dists", "fid", "maniqa", "clipiqa", "musiq")
    assert AUTHORS_METRICS == (*TABLE1_METRICS, "niqe")
    assert [METRICS[name].label for name in AUTHORS_METRICS] == [
        "PSNR", "SSIM", "LPIPS", "DISTS", "FID", "MANIQA", "CLIPIQA", "MUSIQ", "NIQE"]


def test_creation_context_refuses_downloads_and_restores_the_caches(tmp_path):
    import pyiqa.archs.clip_model
    import pyiqa.utils.download_util as download_util
    import torchvision

    hub_dir, cache_dir = torch.hub.get_dir(), download_util.DEFAULT_CACHE_DIR
    with local_weights_only(tmp_path):
        assert download_util.DEFAULT_CACHE_DIR == str(tmp_path.resolve())
        with pytest.raises(WeightDownloadBlocked, match=re.escape(METRICS["lpips"].weight_files[1].url)):
            torchvision.models.alexnet(weights="IMAGENET1K_V1")
        with pytest.raises(WeightDownloadBlocked, match="niqe_modelparameters.mat"):
            download_util.load_file_from_url(METRICS["niqe"].weight_files[0].url)
        with pytest.raises(WeightDownloadBlocked, match=re.escape(METRICS["clipiqa"].weight_files[0].url)):
            pyiqa.archs.clip_model.load("RN50", "cpu")
    assert torch.hub.get_dir() == hub_dir and download_util.DEFAULT_CACHE_DIR == cache_dir
    assert urllib.request.urlopen.__module__ == "urllib.request"
    assert list(tmp_path.iterdir()) == []


def test_missing_files_are_named_and_nothing_is_downloaded(tmp_path, monkeypatch):
    _forbid_downloads(monkeypatch)
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"present, never read")
    lpips, niqe, psnr = prepare_metrics(["lpips", "niqe", "psnr"], tmp_path)
    assert not lpips.computed and not niqe.computed and psnr.computed
    assert "LPIPS_v0.1_alex-df73285e.pth is missing" in lpips.reason and "alexnet" not in lpips.reason
    assert str(tmp_path / "niqe_modelparameters.mat") in niqe.reason
    assert lpips.status_line().startswith("lpips: not computed: ")
    with pytest.raises(RuntimeError, match="not computed"):
        lpips.score(*_photo_pairs(32)[0])
    (unset,) = prepare_metrics(["musiq"], None)
    assert not unset.computed and "musiq_koniq_ckpt-e95806b9.pth" in unset.reason
    absent = tmp_path / "absent"
    (psnr_without_folder,) = prepare_metrics(["psnr"], absent)
    assert psnr_without_folder.computed and not absent.exists()


def test_a_wrong_file_is_reported_and_not_downloaded_again(tmp_path, monkeypatch):
    _forbid_downloads(monkeypatch)
    (tmp_path / "RN50.pt").write_bytes(b"not CLIP")  # wrong SHA-256: CLIP's loader would fetch the real file
    with pytest.warns(UserWarning, match="SHA256 checksum does not match"):
        (clipiqa,) = prepare_metrics(["clipiqa"], tmp_path)
    assert not clipiqa.computed
    assert "WeightDownloadBlocked" in clipiqa.reason and "put the file RN50.pt there" in clipiqa.reason


@pytest.mark.parametrize("name", ["maniqa", "musiq"])
def test_checkpoint_metrics_are_created_from_their_files(tmp_path, monkeypatch, name):
    """A checkpoint in pyiqa's layout (zero-stride tensors: scoring these networks is too slow on one CPU thread)."""
    import timm
    from pyiqa.archs import maniqa_arch, musiq_arch
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    options = dict(DEFAULT_CONFIGS[name]["metric_opts"])
    arch = getattr({"maniqa": maniqa_arch, "musiq": musiq_arch}[name], options.pop("type"))
    create_model = timm.create_model

    def create_unpretrained(*args, **kwargs):
        return create_model(*args, **{**kwargs, "pretrained": False})

    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", create_unpretrained)
        layout = arch(**{**options, "pretrained": False}).state_dict()
    (file,) = METRICS[name].weight_files
    torch.save({key: torch.zeros((), dtype=value.dtype).expand(value.shape) for key, value in layout.items()},
               tmp_path / file.file_name)
    _forbid_downloads(monkeypatch)
    (run,) = prepare_metrics([name], tmp_path)
    assert run.computed, run.reason


def test_lpips_and_dists_run_from_fabricated_weight_files(tmp_path):
    import torchvision

    generator = torch.Generator().manual_seed(0)
    torch.save(_backbone_state(torchvision.models.alexnet(), generator), tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(_backbone_state(torchvision.models.vgg16(), generator), tmp_path / "vgg16-397923af.pth")
    linear = {f"lin{i}.model.1.weight": torch.rand(1, channels, 1, 1, generator=generator)
              for i, channels in enumerate(LPIPS_CHANNELS)}
    torch.save(linear, tmp_path / "LPIPS_v0.1_alex-df73285e.pth")
    channels = 3 + 64 + 128 + 256 + 512 + 512
    torch.save({"alpha": torch.rand(1, channels, 1, 1, generator=generator),
                "beta": torch.rand(1, channels, 1, 1, generator=generator)}, tmp_path / "DISTS_weights-f5e65c96.pth")
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    (doubled / "alexnet-owt-7be5be79.pth").symlink_to(tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({key: 2 * value for key, value in linear.items()}, doubled / "LPIPS_v0.1_alex-df73285e.pth")

    lpips, dists = prepare_metrics(["lpips", "dists"], tmp_path)
    (lpips_doubled,) = prepare_metrics(["lpips"], doubled)
    pairs = _photo_pairs(96)
    for run in (lpips, dists):
        assert run.computed, run.reason
        values = [run.score(sr, hr) for sr, hr in pairs]
        assert all(math.isfinite(value) and value > 0 for value in values)
        assert len(set(values)) == len(values)
        assert run.score(pairs[0][1], pairs[0][1]) == pytest.approx(0.0, abs=1e-5)
    # LPIPS is linear in its linear layers: twice the weights, twice the distance (so the file is what is used)
    assert lpips_doubled.score(*pairs[0]) == pytest.approx(2 * lpips.score(*pairs[0]), rel=1e-5)
    with pytest.raises(UserError, match="HR size"):
        lpips.score(pairs[0][0], pairs[0][1][:64])


def test_niqe_runs_from_a_fabricated_pristine_model(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    factor = rng.normal(size=(36, 36))
    for folder, shift in (("one", 0.0), ("two", 1.0)):
        (tmp_path / folder).mkdir()
        scipy.io.savemat(tmp_path / folder / "niqe_modelparameters.mat",
                         {"mu_prisparam": rng.normal(size=(1, 36)) + shift,
                          "cov_prisparam": factor @ factor.T / 36 + np.eye(36)})
    (niqe,) = prepare_metrics(["niqe"], tmp_path / "one")
    (niqe_two,) = prepare_metrics(["niqe"], tmp_path / "two")
    images = [sr for sr, _ in _photo_pairs(192)]
    values = [niqe.score(image) for image in images]
    assert all(math.isfinite(value) for value in values) and len(set(values)) == len(values)
    assert niqe_two.score(images[0]) != pytest.approx(values[0])


def test_fid_is_created_from_fabricated_inception_weights(tmp_path, monkeypatch):
    """Scoring is left out: the 2048 x 2048 matrix square root takes minutes on one CPU thread."""
    from pyiqa.archs import inception

    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_pretrained_network", lambda *args, **kwargs: None)
        layout = inception.fid_inception_v3().state_dict()
    # zero-stride tensors: the right shapes in a file of a few hundred kilobytes
    torch.save({key: torch.ones((), dtype=value.dtype).expand(value.shape) for key, value in layout.items()},
               tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    (fid,) = prepare_metrics(["fid"], tmp_path)
    assert fid.computed, fid.reason
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    with pytest.raises(UserError, match="does not exist"):
        fid.score_folders(sr_dir, hr_dir)
    sr_dir.mkdir()
    hr_dir.mkdir()
    Image.fromarray(photo("coffee", (32, 32))).save(sr_dir / "coffee.png")
    with pytest.raises(UserError, match="at least 2"):
        fid.score_folders(sr_dir, hr_dir)
    with pytest.raises(ValueError, match="score_folders"):
        fid.score(photo("coffee", (32, 32)))


def test_without_pyiqa_only_our_metrics_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa now raises ImportError
    runs = {run.name: run for run in prepare_metrics(["psnr_y", "psnr", "lpips", "fid", "ssim_y"], tmp_path)}
    sr, hr = _photo_pairs(64)[0]
    assert runs["psnr_y"].computed and runs["psnr_y"].score(sr, hr) == psnr_y(sr, hr)
    assert runs["ssim_y"].score(sr, hr) == ssim_y(sr, hr)
    for name in ("psnr", "lpips", "fid"):
        assert not runs[name].computed and runs[name].reason == PYIQA_MISSING


def test_another_pyiqa_version_is_not_used(monkeypatch):
    import pyiqa

    monkeypatch.setattr(pyiqa, "__version__", "0.1.10")
    (psnr,) = prepare_metrics(["psnr"], None)
    assert not psnr.computed and "pyiqa 0.1.10 is installed" in psnr.reason


def test_bad_metric_lists_are_user_errors():
    with pytest.raises(UserError, match="Unknown metrics \\['psnr-y'\\]; choose from psnr, ssim, lpips"):
        prepare_metrics(["psnr-y"], None)
    with pytest.raises(UserError, match="more than once"):
        prepare_metrics(["psnr_y", "psnr_y"], None)
