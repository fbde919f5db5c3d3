"""Images in (METHOD.md B4): ImageFolder data set, torch and DALI pipelines with the same transforms, the per-rank
loader, and the embedded default set built from scikit-image's photographs (python -m tokpost_fast.data.embedded)."""

from tokpost_fast.data.config import DataConfig
from tokpost_fast.data.dali import DaliImageLoader, dali_available
from tokpost_fast.data.folder import CropParams, ImageFolderDataset, crop_params, scan_image_folder
from tokpost_fast.data.loader import ImageLoader, build_loader

__all__ = [
    "CropParams",
    "DaliImageLoader",
    "DataConfig",
    "ImageFolderDataset",
    "ImageLoader",
    "build_embedded",
    "build_loader",
    "crop_params",
    "dali_available",
    "scan_image_folder",
]


def __getattr__(name: str):
    # Lazy, so `python -m tokpost_fast.data.embedded` does not import the module twice (runpy warns).
    if name == "build_embedded":
        from tokpost_fast.data.embedded import build_embedded

        return build_embedded
    raise AttributeError(f"module 'tokpost_fast.data' has no attribute {name!r}")
