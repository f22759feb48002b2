"""Pictures in and out: files and PIL images ↔ float tensors in [−1, 1].

Stable Diffusion's VAE reads and writes pictures as float tensors (B, 3, H, W) with values in
[−1, 1] (pixel/127.5 − 1); this module is the one place that converts to and from files and
PIL images (Pillow does the file formats). Pictures come in every mode Pillow opens; `to_rgb`
turns each into the 8-bit RGB the VAE was trained on:

- 8-bit greyscale, 1-bit, palette, CMYK, YCbCr, LAB, HSV: Pillow's own conversion;
- 16-bit greyscale ("I;16", and "I" holding 0 … 65535): scaled by 255/65535 (Pillow's plain
  conversion clips at 255, which turns them white);
- float greyscale ("F"): values in [0, 1] scaled by 255, values in [0, 255] kept (Pillow's
  plain conversion clips [0, 1] to 0 or 1, which turns them black); other ranges refused;
- with transparency (RGBA, LA, PA, palette with a transparent colour): composited on white,
  as a viewer shows them (dropping the alpha channel would bring back whatever colour the
  invisible pixels happen to hold).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from minisd.package_data import SAMPLE_IMAGES, sample_image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → an 8-bit RGB one (the rules in the module docstring).

    Raises:
        ValueError for a picture with no pixels (0×0), a float picture whose values are not
        in [0, 1] or [0, 255], a 32-bit integer picture outside 0 … 65535, or a mode Pillow
        cannot convert, naming the mode and what to do.
    """
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the picture is {image.width}×{image.height} pixels: it has no "
                         "pixels to draw from")
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"a {image.mode!r} picture with values from {values.min():g} to "
                             f"{values.max():g}; minisd reads integer greyscale as 16-bit "
                             "(0 … 65535): save it as an 8- or 16-bit picture")
        return _grey(values * (255 / 65535))
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        low, high = values.min(), values.max()
        if not np.isfinite(values).all() or low < 0 or high > 255:
            raise ValueError(f"a float ('F') picture with values from {low:g} to {high:g}; "
                             "minisd reads float greyscale in [0, 1] or [0, 255]: rescale it")
        return _grey(values * 255 if high <= 1 else values)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        try:
            rgba = image.convert("RGBA")
        except ValueError as error:
            raise _unconvertible(image, error) from None
        white = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise _unconvertible(image, error) from None


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")


def _unconvertible(image: Image.Image, error: ValueError) -> ValueError:
    return ValueError(f"cannot read a picture in Pillow mode {image.mode!r} ({error}); save "
                      "it as RGB or RGBA")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode → float32 (3, H, W) in [−1, 1] (`to_rgb`, then pixel/127.5 − 1).
    Errors as in `to_rgb`."""
    pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def load_image(name_or_path: str | Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Load a sample photo by name (see `minisd.package_data.SAMPLE_IMAGES`) or any image
    file by path, upright (as its EXIF orientation says), in any mode (see `to_rgb`).

    Args:
        name_or_path: "astronaut", "cat", "coffee", "rocket", or a path to an image file.
        size: None keeps the file's size; an int resizes the short side to `size` and
            centre-crops to a square `size`×`size`; (height, width) resizes to exactly that.
    Returns:
        float32 tensor (3, H, W) with values in [−1, 1].
    Raises:
        FileNotFoundError for an unknown name (listing the available ones) or a missing file;
        ValueError for a file that is not a picture Pillow can read, and the errors of
        `to_rgb`.
    """
    if str(name_or_path) in SAMPLE_IMAGES:
        path = sample_image(str(name_or_path))
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no sample image or file named {str(name_or_path)!r}; "
                                    f"sample images: {', '.join(SAMPLE_IMAGES)}")
    try:
        with Image.open(path) as opened:
            image = to_rgb(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a picture Pillow can read ({error})") from None
    if isinstance(size, int):
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.LANCZOS)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif size is not None:
        height, width = size
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image_to_tensor(image)
