"""Baseline upscalers: PIL bicubic, and Real-ESRGAN from RRDBNet checkpoints in the released layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo
from xpsr_core.errors import UserError
from xpsr_core.evaluation.baselines import RealESRGANUpscaler, RRDBNetShape, bicubic_upscale, load_rrdbnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return photo("astronaut")


def random_rrdbnet(scale: int = 4, num_block: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small RRDBNet with seeded weights; its last conv is centred and widened so outputs span [0, 1]."""
    shape = RRDBNetShape(scale=scale, num_feat=8, num_block=num_block, num_grow_ch=4)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = shape.build()
    with torch.no_grad():
        network.conv_last.bias.fill_(0.5)
        network.conv_last.weight.mul_(30.0)
    return network.eval()


def by_hand(network: torch.nn.Module, lr: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        output = network(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255.0).clamp(0, 1)
    return (output[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def test_bicubic_sizes_and_pil(astronaut):
    lr = astronaut[100:124, 180:210]
    for scale in (2, 4):
        upscaled = bicubic_upscale(lr, scale)
        assert upscaled.shape == (24 * scale, 30 * scale, 3) and upscaled.dtype == np.uint8
        expected = np.asarray(Image.fromarray(lr).resize((30 * scale, 24 * scale), Image.BICUBIC))
        np.testing.assert_array_equal(upscaled, expected)


def test_bicubic_rejects_bad_input(astronaut):
    with pytest.raises(UserError, match="RGB uint8"):
        bicubic_upscale(astronaut.astype(np.float32), 4)
    with pytest.raises(UserError, match="positive integer"):
        bicubic_upscale(astronaut[:8, :8], 0)


@pytest.mark.parametrize("layout", ["params_ema", "params", "bare"])
def test_checkpoint_layouts_load_and_match_the_network(tmp_path, astronaut, layout):
    network = random_rrdbnet()
    state = network.state_dict()
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save(state if layout == "bare" else {layout: state}, path)
    lr = astronaut[60:76, 200:216]

    upscaler = RealESRGANUpscaler.from_file(path)
    output = upscaler(lr)

    assert upscaler.scale == 4
    assert output.shape == (64, 64, 3) and output.dtype == np.uint8
    expected = by_hand(network, lr)
    np.testing.assert_array_equal(output, expected)
    assert len(np.unique(expected)) > 100  # the comparison sees detail, not a clamped flat image


def test_params_ema_preferred_over_params(tmp_path, astronaut):
    ema, raw = random_rrdbnet(seed=1), random_rrdbnet(seed=2)
    path = tmp_path / "both.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    lr = astronaut[60:76, 200:216]
    np.testing.assert_array_equal(RealESRGANUpscaler.from_file(path)(lr), by_hand(ema, lr))
    assert not np.array_equal(by_hand(ema, lr), by_hand(raw, lr))


def test_shape_is_inferred_from_the_state_dict():
    assert RRDBNetShape.from_state_dict(random_rrdbnet(num_block=3).state_dict()) == RRDBNetShape(4, 8, 3, 4)
    assert RRDBNetShape.from_state_dict(random_rrdbnet(scale=2).state_dict()) == RRDBNetShape(2, 8, 2, 4)


def test_x2_model_pads_odd_sizes(tmp_path, astronaut):
    network = random_rrdbnet(scale=2)
    path = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": network.state_dict()}, path)
    upscaler = RealESRGANUpscaler.from_file(path)
    even = astronaut[60:76, 200:216]
    np.testing.assert_array_equal(upscaler(even), by_hand(network, even))
    odd = astronaut[60:75, 200:217]
    output = upscaler(odd)
    assert output.shape == (30, 34, 3)
    # Real-ESRGAN's mod padding: reflect the bottom and right edges to even sizes, crop the output back
    padded = np.pad(odd, ((0, 1), (0, 1), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(output, by_hand(network, padded)[:30, :34])


def test_wrong_checkpoints_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_rrdbnet(tmp_path / "missing.pth")

    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="text.pth: the file is truncated or corrupt"):
        load_rrdbnet(text)

    compact = tmp_path / "compact.pth"  # SRVGGNetCompact-style names (realesr-general-x4v3)
    torch.save({"params": {"body.0.weight": torch.zeros(64, 3, 3, 3), "body.0.bias": torch.zeros(64)}}, compact)
    with pytest.raises(UserError, match="not an RRDBNet.*body.0.weight"):
        load_rrdbnet(compact)

    extra = tmp_path / "extra.pth"
    torch.save({"params_ema": {**random_rrdbnet().state_dict(), "head.weight": torch.zeros(3)}}, extra)
    with pytest.raises(UserError, match="unexpected keys head.weight"):
        load_rrdbnet(extra)

    state = random_rrdbnet().state_dict()
    state["conv_up1.weight"] = torch.zeros(8, 8, 1, 1)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(UserError, match="shapes do not match"):
        load_rrdbnet(wrong_shape)


def test_bad_tiles_and_images_raise_user_errors(astronaut):
    with pytest.raises(UserError, match="multiples of 2"):
        RealESRGANUpscaler(random_rrdbnet(scale=2), tile=7)
    with pytest.raises(UserError, match="RGB uint8"):
        RealESRGANUpscaler(random_rrdbnet())(astronaut[:16, :16, 0])


@pytest.mark.parametrize("scale", [4, 2])
def test_tiles_with_enough_context_equal_the_whole_image(astronaut, scale):
    # with one RRDB, 20 pixels of context reach far enough for tiles to match (to one level where rounding differs)
    network = random_rrdbnet(scale=scale, num_block=1)
    lr = astronaut[40:88, 180:228]
    whole = RealESRGANUpscaler(network)(lr)
    tiled = RealESRGANUpscaler(network, tile=16, tile_pad=20)(lr)
    assert tiled.shape == whole.shape == (48 * scale, 48 * scale, 3)
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1
    assert np.mean(tiled == whole) > 0.999
    without_context = RealESRGANUpscaler(network, tile=16, tile_pad=0)(lr)
    assert np.abs(without_context.astype(int) - whole.astype(int)).max() > 1
