"""Pictures in and out: files and PIL images ↔ float tensors in [−1, 1].

Stable Diffusion's VAE reads and writes pictures as float tensors (B, 3, H, W) with values in
[−1, 1] (pixel/127.5 − 1); this module is the one place that converts to and from files and
PIL images (Pillow does the file formats).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.package_data import SAMPLE_IMAGES, sample_image


def load_image(name_or_path: str | Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Load a sample photo by name (see `minisd.package_data.SAMPLE_IMAGES`) or any image
    file by path.

    Args:
        name_or_path: "astronaut", "cat", "coffee", "rocket", or a path to an image file.
        size: None keeps the file's size; an int resizes the short side to `size` and
            centre-crops to a square `size`×`size`; (height, width) resizes to exactly that.
    Returns:
        float32 tensor (3, H, W) with values in [−1, 1].
    Raises:
        FileNotFoundError for an unknown name (listing the available ones) or a missing file.
    """
    if str(name_or_path) in SAMPLE_IMAGES:
        path = sample_image(str(name_or_path))
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no sample image or file named {str(name_or_path)!r}; "
                                    f"sample images: {', '.join(SAMPLE_IMAGES)}")
    image = Image.open(path).convert("RGB")
    if isinstance(size, int):
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.LANCZOS)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif size is not None:
        height, width = size
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0
