"""Sub-patch refinement of query pixels (aceg_model.pixel_refinement) on synthetic descriptor fields."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aceg_model.landmarks import SweepViews
from aceg_model.pixel_refinement import refine_pixels

SCALE = 3
FINE_HW = (45, 60)  # the fine grid of a 120x160 working image at 3x


def smooth_field(seed: int, dims: int = 64) -> torch.Tensor:
    """``(h*w) x dims`` descriptors that vary smoothly over the fine grid, as CNN features do."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dims, FINE_HW[0] // 3 + 1, FINE_HW[1] // 3 + 1, generator=gen)
    field = F.interpolate(coarse, size=FINE_HW, mode="bicubic", align_corners=True)[0]
    return field.flatten(1).T.contiguous()


def keys_at(desc_QK: torch.Tensor, pixels_P2: torch.Tensor) -> torch.Tensor:
    """Unit fine keys sampled where the landmarks truly are (working-resolution pixels)."""
    views = SweepViews(desc_QK.unsqueeze(0), FINE_HW, None, None, SCALE)
    return F.normalize(views.sample(torch.zeros(len(pixels_P2), dtype=torch.long),
                                    views.to_sweep_pixels(pixels_P2)), dim=-1)


def test_refinement_finds_the_landmark_within_its_patch() -> None:
    """Landmarks at random sub-pixel positions, each searched from a patch centre up to 4 px off:
    the refined pixels land within a fraction of a pixel, the centres were ~2-3 px off."""
    gen = torch.Generator().manual_seed(1)
    desc = smooth_field(0)
    truth = torch.rand(300, 2, generator=gen) * torch.tensor([120.0, 80.0]) + torch.tensor([20.0, 20.0])
    centres = truth + (torch.rand(300, 2, generator=gen) * 8.0 - 4.0)
    refined, best_cos = refine_pixels(keys_at(desc, truth), desc, FINE_HW, SCALE, centres, window_px=6)
    before = (centres - truth).norm(dim=1).median().item()
    after = (refined - truth).norm(dim=1)
    assert before > 2.0
    assert after.median().item() < 0.35 and (after < 1.0).float().mean().item() > 0.9, after.median()
    assert best_cos.min().item() > 0.95  # the key itself is found (interpolation gives < 1 between samples)


def test_refinement_window_bounds_the_move() -> None:
    """A landmark farther away than the window: the pixel moves at most window_px along each axis."""
    desc = smooth_field(2)
    truth = torch.tensor([[80.0, 60.0]])
    centres = truth + torch.tensor([[9.0, -7.0]])
    refined, _ = refine_pixels(keys_at(desc, truth), desc, FINE_HW, SCALE, centres, window_px=3)
    move = (refined - centres).abs()
    assert (move <= 3.0 + 1e-5).all(), move


def test_refinement_checks_its_arguments() -> None:
    desc = smooth_field(3)
    centres = torch.tensor([[50.0, 40.0]])
    with pytest.raises(ValueError, match="window_px"):
        refine_pixels(keys_at(desc, centres), desc, FINE_HW, SCALE, centres, window_px=0)
    with pytest.raises(ValueError, match="fine keys but"):
        refine_pixels(keys_at(desc, centres).repeat(2, 1), desc, FINE_HW, SCALE, centres, window_px=4)


def test_fine_encoding_in_bfloat16_keeps_the_descriptors() -> None:
    """pnp.refine_bf16: the shipped encoder under bfloat16 autocast on the CPU gives the fine
    descriptors of float32 to within a small angle, as float32 unit vectors."""
    import numpy as np
    from pathlib import Path

    from aceg_model.frames import Intrinsics
    from aceg_model.model import AcegModel
    from aceg_model.pixel_refinement import encode_fine

    model = AcegModel.load(Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors",
                           torch.device("cpu"))
    rng = np.random.default_rng(0)
    # A smooth random image: texture at several scales, like a photo's, not pixel noise.
    image = sum(np.kron(rng.random((480 // s, 640 // s)), np.ones((s, s))) for s in (4, 16, 32)) / 3
    image = np.repeat((255 * image).astype(np.uint8)[:, :, None], 3, axis=2)
    K = Intrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)
    with torch.inference_mode():
        full, hw, _ = encode_fine(model, image, K, 2)
        half, hw_bf16, _ = encode_fine(model, image, K, 2, bf16=True)
    assert hw == hw_bf16 and half.dtype == torch.float32
    assert torch.allclose(half.norm(dim=1), torch.ones(len(half)), atol=1e-4)
    cos = (full * half).sum(dim=1)
    assert cos.min() > 0.99 and cos.mean() > 0.999
    assert not torch.equal(full, half)  # it did run in bfloat16
