"""Per-image reference for the degradation: plain basicsr operations, one image at a time.

This is how the Real-ESRGAN / SeeSR data scripts degrade (dense 51x51 ``USMSharp``,
``filter2D``, ``F.interpolate``, basicsr's noise functions, ``DiffJPEG``), driven by the same
``DegradationParams`` as the library so the two can be compared pixel by pixel.

basicsr's noise functions draw from torch's *global* generator; seeding it with the sample's
noise seed right before each call reproduces the library's per-sample noise (both draw the
same normals / Poisson variates from the same seed), so differences left are float rounding.
It is a benchmark/test helper and deliberately not part of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# basicsr's noise functions, imported after compat has installed the torchvision alias.
from basicsr.data.degradations import add_gaussian_noise_pt, add_poisson_noise_pt  # noqa: E402

from xpsr_core.degrade.compat import DiffJPEG, USMSharp, filter2D
from xpsr_core.degrade.sampling import DegradationParams, StageParams
from xpsr_core.degrade.settings import DegradationSettings


class ReferenceDegrader:
    """Real-ESRGAN's feed_data for one image at a time, with externally given random choices."""

    def __init__(self, settings: DegradationSettings, device: str | torch.device = "cpu"):
        self.settings = settings
        self.device = torch.device(device)
        self.usm = USMSharp(radius=settings.usm_radius).to(self.device)
        self.jpeger = DiffJPEG(differentiable=False).to(self.device)

    def _noise(self, out: torch.Tensor, stage: StageParams) -> torch.Tensor:
        gray = out.new_tensor([1.0 if stage.noise_gray else 0.0])
        torch.manual_seed(stage.noise_seed)
        if stage.noise_type == "gaussian":
            sigma = out.new_tensor([stage.noise_sigma])
            return add_gaussian_noise_pt(out, sigma=sigma, gray_noise=gray, clip=True, rounds=False)
        scale = out.new_tensor([stage.noise_poisson_scale])
        return add_poisson_noise_pt(out, scale=scale, gray_noise=gray, clip=True, rounds=False)

    def _jpeg(self, out: torch.Tensor, quality: float) -> torch.Tensor:
        out = torch.clamp(out, 0, 1)
        return self.jpeger(out, quality=out.new_tensor([quality])).contiguous()

    @torch.no_grad()
    def __call__(
        self, gt: torch.Tensor, p: DegradationParams, usm_hr: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """gt: [1, 3, H, W] in [0, 1]. Returns (hr_target, lr) like ``degrade_batch`` for one image."""
        s = self.settings
        ori_h, ori_w = gt.shape[2:4]
        gt_usm = self.usm(gt, weight=s.usm_weight, threshold=s.usm_threshold) if usm_hr else gt
        source = gt_usm if (usm_hr and s.degrade_sharpened) else gt

        def kernel(array):
            return torch.from_numpy(array).unsqueeze(0).to(self.device)

        # first degradation
        out = filter2D(source, kernel(p.kernel1))
        out = F.interpolate(out, scale_factor=p.stage1.resize_scale, mode=p.stage1.resize_mode)
        out = self._noise(out, p.stage1)
        out = self._jpeg(out, p.jpeg1_quality)
        # second degradation
        if p.blur2_applied:
            out = filter2D(out, kernel(p.kernel2))
        size = (int(ori_h / s.scale * p.stage2.resize_scale), int(ori_w / s.scale * p.stage2.resize_scale))
        out = F.interpolate(out, size=size, mode=p.stage2.resize_mode)
        out = self._noise(out, p.stage2)
        lr_size = (ori_h // s.scale, ori_w // s.scale)
        if p.final_order == "resize_first":
            out = F.interpolate(out, size=lr_size, mode=p.final_resize_mode)
            out = filter2D(out, kernel(p.sinc_kernel))
            out = self._jpeg(out, p.jpeg2_quality)
        else:
            out = self._jpeg(out, p.jpeg2_quality)
            out = F.interpolate(out, size=lr_size, mode=p.final_resize_mode)
            out = filter2D(out, kernel(p.sinc_kernel))
        lr = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
        return gt_usm, lr


def reference_degrade(
    hr: torch.Tensor, params: list[DegradationParams], settings: DegradationSettings, usm_hr: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop the reference over a batch (one image at a time) and stack the results."""
    degrader = ReferenceDegrader(settings, hr.device)
    targets, lrs = [], []
    for index, p in enumerate(params):
        target, lr = degrader(hr[index : index + 1], p, usm_hr)
        targets.append(target)
        lrs.append(lr)
    return torch.cat(targets), torch.cat(lrs)
