"""Real-ESRGAN second-order degradation: settings, per-sample parameter sampling, batched application.

    from xpsr_core.degrade import DegradationSettings, sample_degradation, degrade_batch
    params = [sample_degradation(numpy_rng(seed, "degrade", key), settings, 512) for key in keys]
    hr_target, lr = degrade_batch(hr, params, settings)      # hr: [B, 3, 512, 512] in [0, 1]
    records = [p.to_record() for p in params]               # the sampled scalars, per sample

The names load on first use: ``xpsr_core.degrade.settings`` imports no torch. basicsr is imported
only through ``compat`` (it needs a torchvision shim first).
"""

from .. import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("degrade_batch", "filter2d", "gaussian_kernel_1d", "resize", "usm_sharpen"), ".pipeline"),
    **dict.fromkeys(("DegradationParams", "KernelParams", "StageParams", "sample_degradation"), ".sampling"),
    "DegradationSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
