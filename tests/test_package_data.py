"""The files found through minisd.package_data: chapter 4's stored small U-Net."""

import pytest
import torch
from safetensors.torch import load_file

from minisd import package_data
from minisd.pipeline import StableDiffusionPipeline
from minisd.training.unet import UNetTrainConfig, sampling_scheduler, unet_config
from minisd.unet import UNet2DConditionModel


def test_course_unet_is_the_small_recipe_stored_in_float16_under_a_megabyte():
    folder = package_data.course_unet()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 2**20
    assert {tensor.dtype for tensor in load_file(weights).values()} == {torch.float16}
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    expected = unet_config(UNetTrainConfig(block_out_channels=(16, 32, 32)), 128)
    assert unet.config == expected


def test_course_unet_draws_with_the_bundled_parts():
    pipe = StableDiffusionPipeline.from_pretrained(device="cpu", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(package_data.course_unet(), subfolder="unet")
    student = StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, unet,
                                      sampling_scheduler(UNetTrainConfig()))
    images = student(["a red circle on a black background", "a red circle on a white background"],
                     num_inference_steps=4, guidance_scale=2.5, seed=0, output_type="pt",
                     progress=False).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    border = torch.cat([images[:, :, 0], images[:, :, -1]], dim=-1).mean(dim=(1, 2))
    assert border[0] < 0.3 < 0.7 < border[1]   # black and white backgrounds, as asked


def test_course_unet_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(package_data, "data_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="chapter 4's small U-Net.*reinstall minisd"):
        package_data.course_unet()
