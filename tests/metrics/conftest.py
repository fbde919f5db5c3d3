import pytest
import torch

from tests.metrics.helpers import photo_crops, train_tiny_tokenizer

NUM_IMAGES = 96


@pytest.fixture(scope="session")
def photos():
    """[96, 3, 16, 16] crops of the embedded data's source photographs, in [-1, 1]."""
    return photo_crops(NUM_IMAGES, size=16, seed=0)


@pytest.fixture(scope="session")
def trained_tokenizer(photos):
    """A tiny CNN tokenizer (K = 64, 8x8 grid) after 30 steps of plain MSE (+ codebook / commitment) on photos."""
    # One intra-op thread: on a shared 2-core machine, 2 OpenMP threads run 2-3x slower than 1 under contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = train_tiny_tokenizer(photos, steps=30, batch=16)
    finally:
        torch.set_num_threads(threads)
    return model
