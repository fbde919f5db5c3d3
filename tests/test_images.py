"""tokpost_fast.images: the one image-grid writer (sample CLI, stage sample grids, report) against torchvision's
make_grid, the layout every caller had before it was one function."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from tokpost_fast.images import image_grid, save_image_grid


def make_grid_reference(images: torch.Tensor, nrow: int, pad: int) -> np.ndarray:
    grid = make_grid((images.float() + 1) / 2, nrow=nrow, padding=pad, pad_value=1.0)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("count, nrow, pad", [(6, 2, 2), (7, 3, 2), (5, 8, 1), (4, 4, 0), (3, 1, 3)])
def test_grid_matches_make_grid(count, nrow, pad):
    torch.manual_seed(count * 10 + nrow)
    images = torch.rand(count, 3, 5, 7) * 2.4 - 1.2          # awkward sizes, values beyond [-1, 1] are clamped
    assert np.array_equal(image_grid(images, nrow, pad).numpy(), make_grid_reference(images, nrow, pad))


def test_rows_of_a_stage_grid_and_the_png(tmp_path):
    """Three rows of n images (inputs / reconstructions / perturbed) are torch.cat(rows) with nrow = n; the PNG
    holds the exact uint8 grid and no temporary file is left."""
    rows = [torch.full((4, 3, 6, 6), value) for value in (-1.0, 0.0, 1.0)]
    path = tmp_path / "samples" / "grid.png"
    save_image_grid(path, torch.cat(rows), nrow=4)
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (3 * 8 + 2, 4 * 8 + 2, 3)
    assert pixels[2, 2].tolist() == [0, 0, 0] and pixels[10, 2].tolist() == [128, 128, 128]
    assert pixels[18, 2].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(pixels, image_grid(torch.cat(rows), 4).numpy())
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="nrow"):
        image_grid(torch.zeros(2, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="pad"):
        image_grid(torch.zeros(2, 3, 4, 4), 2, pad=-1)
    with pytest.raises(ValueError, match="images"):
        image_grid(torch.zeros(3, 4, 4), 2)
