"""Pictures a user really has: every mode Pillow opens becomes the RGB picture a viewer shows,
in one place (minisd.images), used by load_image, the pipeline and the command line."""

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from minisd.images import image_to_tensor, load_image, to_rgb


def pixel(image: Image.Image) -> tuple:
    """The RGB value of the top-left pixel after conversion."""
    return to_rgb(image).getpixel((0, 0))


def test_16_bit_greyscale_is_scaled_not_clipped_to_white():
    """0, 32768 and 65535 of an "I;16" picture are 0, 128 and 255 (Pillow's own conversion
    clips everything above 255 to white); big-endian and 32-bit "I" pictures alike."""
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(">u2")),
                  Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16", "I;16B", "I")
        assert np.asarray(to_rgb(image))[0].tolist() == [[0] * 3, [128] * 3, [255] * 3]
    with pytest.raises(ValueError, match="'I' picture with values from 0 to 70000"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_float_greyscale_in_0_1_or_0_255_is_not_black():
    """An "F" picture of 0.5 is mid-grey 128 (Pillow's own conversion gives 0); one in
    [0, 255] keeps its values; other ranges and NaN are refused."""
    assert pixel(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))) == (128, 128, 128)
    assert pixel(Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32))) == (200, 200, 200)
    for values in ([[-1.0, 0.5]], [[0.0, 300.0]], [[0.0, float("nan")]]):
        with pytest.raises(ValueError, match="float \\('F'\\) picture with values"):
            to_rgb(Image.fromarray(np.array(values, dtype=np.float32)))


def test_transparency_is_composited_on_white():
    """Alpha 0 is white whatever colour hides under it, alpha 255 the colour itself, alpha 128
    half way: RGBA, LA, PA and a palette with a transparent index alike."""
    assert pixel(Image.new("RGBA", (2, 2), (255, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("RGBA", (2, 2), (255, 0, 0, 255))) == (255, 0, 0)
    assert pixel(Image.new("RGBA", (2, 2), (0, 0, 255, 128))) == (127, 127, 255)
    assert pixel(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)
    assert pixel(Image.new("LA", (2, 2), (40, 255))) == (40, 40, 40)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    assert pixel(palette) == (0, 255, 0)
    palette.info["transparency"] = 1
    assert pixel(palette) == (255, 255, 255)
    assert pixel(Image.new("PA", (2, 2), (0, 0))) == (255, 255, 255)


def test_other_modes_convert_as_pillow_does():
    assert pixel(Image.new("CMYK", (2, 2), (0, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)
    assert pixel(Image.new("L", (2, 2), 100)) == (100, 100, 100)
    assert pixel(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert pixel(Image.new("RGB", (2, 2), (1, 2, 3)).convert("YCbCr")) == pytest.approx(
        (1, 2, 3), abs=2)
    assert pixel(Image.new("RGB", (2, 2), (10, 200, 30)).convert("HSV")) == pytest.approx(
        (10, 200, 30), abs=2)


def test_an_empty_or_unconvertible_picture_is_a_clear_error():
    with pytest.raises(ValueError, match="the picture is 0×0 pixels: it has no pixels"):
        to_rgb(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="the picture is 5×0 pixels"):
        image_to_tensor(Image.new("L", (5, 0)))
    with pytest.raises(ValueError, match="Pillow mode 'La'.*save it as RGB or RGBA"):
        to_rgb(Image.new("La", (2, 2)))


def test_image_to_tensor_maps_pixels_to_minus_1_1():
    x = image_to_tensor(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)))
    assert x.shape == (3, 1, 3) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("F", ".tiff"), ("RGBA", ".png"),
                                          ("CMYK", ".jpg"), ("P", ".gif"), ("LA", ".png")])
def test_load_image_reads_files_of_every_mode(tmp_path, mode, suffix):
    """A file saved in each mode loads as its to_rgb conversion."""
    grey = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    if mode == "I;16":
        image = Image.fromarray((grey * 65535).astype(np.uint16))
    elif mode == "F":
        image = Image.fromarray(grey)
    else:
        image = Image.fromarray((np.stack([grey] * 4, -1) * 255).astype(np.uint8), "RGBA")
        image = image.convert(mode)
    path = tmp_path / f"picture{suffix}"
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
        expected = image_to_tensor(opened)
    loaded = load_image(path)
    torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
    assert loaded.max() > -0.5                          # not black


def test_load_image_turns_pictures_upright_and_refuses_non_pictures(tmp_path):
    """A photo whose EXIF orientation says "rotate 90°" (6) loads upright: a 4×2 file is a 2×4
    picture."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (4, 2), "red").save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").shape == (3, 4, 2)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.txt is not a picture Pillow can read"):
        load_image(tmp_path / "notes.txt")


def test_the_pipeline_reads_pictures_of_any_mode_through_minisd_images():
    """img2img from a 16-bit greyscale picture starts from the same latents as from its RGB
    conversion (not from a white picture)."""
    pipe = tiny_pipeline()
    values = (np.linspace(0, 1, 64 * 64).reshape(64, 64) * 65535).astype(np.uint16)
    sixteen_bit = Image.fromarray(values)
    run = {"strength": 0.0, "seed": 1, "output_type": "latent", "progress": False}
    latents = pipe("a red circle", image=sixteen_bit, **run).images
    expected = pipe("a red circle", image=to_rgb(sixteen_bit), **run).images
    white = pipe("a red circle", image=Image.new("RGB", (64, 64), "white"), **run).images
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)
    assert (latents - white).abs().max() > 0.05          # the tiny random VAE: 0.095
    with pytest.raises(ValueError, match="the image is 0×0 pixels"):
        pipe("a red circle", image=Image.new("RGB", (0, 0)), progress=False)
