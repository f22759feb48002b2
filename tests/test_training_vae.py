"""Tests of the bundled VAE's recipe (minisd.training.vae), the committed VAE in
data/minisd-shapes/vae, and the latent interpolation picture (minisd.viz). The `vae` command
itself is run in test_training_cli.py."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from minisd import viz
from minisd.package_data import BUNDLED_MODEL_NAME, data_dir
from minisd.shapes.world import HELD_OUT, ShapesDataset
from minisd.training.vae import (
    INITIAL_LOGVAR,
    RandomCrops,
    VAETrainConfig,
    WorldPictures,
    evaluate_reconstructions,
    format_evaluation,
    full_picture_config,
    latent_std,
    new_vae,
    object_mask,
    psnr,
    train_vae,
    vae_config,
    vae_loss_fn,
)
from minisd.vae import WEIGHTS_NAME, AutoencoderKL, DiagonalGaussianDistribution, vae_loss

BUNDLED_VAE = data_dir() / BUNDLED_MODEL_NAME / "vae"
# Measured on the committed VAE (see data/minisd-shapes/README.md): mean PSNR of the first
# 64 test pictures; the test allows 0.5 dB less (float rounding across machines is far smaller).
BUNDLED_PSNR_64 = 36.39


TINY = {"block_out_channels": (8, 16), "norm_num_groups": 4}


def tiny_config():
    """Two levels (f = 2), 8 and 16 channels: a VAE that trains a step in milliseconds."""
    return vae_config(VAETrainConfig(**TINY))


def quiet(**overrides) -> VAETrainConfig:
    """The recipe at tiny settings: 3 crop steps of 4 on 32 pictures, no checkpoints."""
    return VAETrainConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False,
                             "device": "cpu", "out_dir": None, "train_samples": 32,
                             "scale_samples": 12, "eval_samples": 0, **TINY, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step run of the recipe on a tiny config, saved (float16) to a temporary folder."""
    model = tmp_path_factory.mktemp("tiny")
    result = train_vae(quiet(output=str(model), crop_size=16, full_steps=2, full_batch_size=4))
    return model / "vae", result


# The recipe


def test_recipe_trains_saves_float16_and_reloads(tiny_run):
    folder, result = tiny_run
    assert result.evaluation is None
    for history, steps in ((result.crop_history, 3), (result.full_history, 2)):
        for key in ("loss", "reconstruction", "kl"):
            assert len(history[key]) == steps
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["block_out_channels"] == [8, 16] and config["latent_channels"] == 4
    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        names = f.keys()
        assert len(names) == len(result.vae.state_dict())
        assert {f.get_tensor(k).dtype for k in names} == {torch.float16}
    reloaded = AutoencoderKL.from_pretrained(folder)
    assert next(reloaded.parameters()).dtype == torch.float32
    assert reloaded.scaling_factor == config["scaling_factor"] == result.vae.scaling_factor
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, result.vae.state_dict()[key], rtol=0, atol=0)


def test_saved_vae_loads_in_diffusers_and_agrees(tiny_run):
    diffusers = pytest.importorskip("diffusers")
    folder, result = tiny_run
    theirs = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert theirs.config.scaling_factor == pytest.approx(result.vae.scaling_factor, rel=1e-12)
    x = ShapesDataset("test", 2)[0][0][None]
    with torch.no_grad():
        ours = result.vae.encode(x)
        reference = theirs.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, reference.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.vae.decode(ours.mean),
                                   theirs.decode(reference.mean).sample, rtol=1e-5, atol=1e-5)


def test_scaling_factor_is_one_over_the_std_of_training_latents():
    result = train_vae(quiet(seed=3, output=None, crop_size=None, full_steps=2,
                             full_batch_size=4))
    vae = result.vae
    assert result.crop_history == {} and len(result.full_history["loss"]) == 2
    images = torch.stack([ShapesDataset("train", 12)[i][0] for i in range(12)])  # U-Net's data
    with torch.no_grad():
        z = vae.encode(images).sample(torch.Generator().manual_seed(3))  # seed = config.seed
        assert vae.scaling_factor == pytest.approx(1 / z.flatten().std().item(), rel=1e-5)
        scaled = vae.encode_latents(images, torch.Generator().manual_seed(3))
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-5)
    assert vae.scaling_factor != 1.0  # the placeholder of bundled_vae_config was replaced


def test_bad_recipe_arguments():
    with pytest.raises(ValueError, match="VAETrainConfig.scale_samples must be at least 1"):
        quiet(scale_samples=0)
    with pytest.raises(ValueError, match="nothing to train"):
        quiet(crop_size=None, full_steps=0)
    with pytest.raises(ValueError, match="reconstruction must be one of l2, l1"):
        quiet(reconstruction="l3")
    with pytest.raises(ValueError, match="crop size 15 is not a multiple of 2"):
        train_vae(quiet(output=None, crop_size=15))
    with pytest.raises(ValueError, match="crop size 30 is not a multiple of 4"):
        RandomCrops(WorldPictures(4), 30, multiple=4)


def test_full_picture_phase_settings():
    config = VAETrainConfig(steps=2400, batch_size=16, lr=1.5e-3, out_dir="runs/vae", seed=5,
                            full_steps=300, full_lr=5e-4, full_batch_size=8)
    full = full_picture_config(config)
    assert (full.steps, full.lr, full.min_lr, full.batch_size, full.warmup_steps) == (
        300, 5e-4, 5e-5, 8, 20)
    assert full.out_dir == str(Path("runs/vae") / "full") and full.seed == 5
    assert full_picture_config(replace(config, out_dir=None, full_steps=1)).out_dir is None


def test_world_pictures_hold_every_pair_and_are_reproducible():
    pictures = WorldPictures(400)
    pairs = {(o.colour, o.shape) for i in range(400) for o in pictures.attributes(i).objects}
    assert set(HELD_OUT) <= pairs and len(pairs) == 18
    torch.testing.assert_close(pictures[7][0], WorldPictures(400)[7][0], rtol=0, atol=0)
    image, caption = pictures[7]
    assert image.shape == (3, 64, 64) and caption == ""
    assert image.min() >= -1 and image.max() <= 1
    with pytest.raises(IndexError, match="out of range for 400 pictures"):
        pictures[400]


def test_random_crops_lie_on_the_latent_grid():
    image = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(3, 64, 64)  # unique windows
    crops = RandomCrops([(image, "c")] * 60, 32, multiple=4, seed=1)
    offsets = []
    for i in range(60):
        crop, caption = crops[i]
        top, left = divmod(int(crop[0, 0, 0]), 64)
        torch.testing.assert_close(crop, image[:, top:top + 32, left:left + 32], rtol=0, atol=0)
        offsets.append((top, left))
    assert caption == "c" and len(crops) == 60
    assert all(top % 4 == 0 and left % 4 == 0 for top, left in offsets)
    assert {t for t, _ in offsets} == {l for _, l in offsets} == set(range(0, 33, 4))
    torch.testing.assert_close(crops[3][0], RandomCrops([(image, "c")] * 60, 32, 4, seed=1)[3][0])
    with pytest.raises(ValueError, match="larger than the picture"):
        RandomCrops([(image[:, :16], "c")], 32)[0]


def test_new_vae_starts_with_a_narrow_posterior():
    config = tiny_config()
    torch.manual_seed(0)
    plain = AutoencoderKL(config)
    torch.manual_seed(0)
    narrow = new_vae(config)
    bias, shifted = plain.quant_conv.bias, narrow.quant_conv.bias
    torch.testing.assert_close(shifted[:4], bias[:4], rtol=0, atol=0)
    torch.testing.assert_close(shifted[4:], bias[4:] + INITIAL_LOGVAR, rtol=0, atol=0)
    x = torch.stack([WorldPictures(2)[i][0] for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(narrow.encode(x).logvar, plain.encode(x).logvar - 4.0)


def test_loss_fn_is_vae_loss_on_a_sampled_latent():
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_config())
    images = torch.stack([ShapesDataset("train", 2)[i][0] for i in range(2)])
    torch.manual_seed(1)
    terms = vae_loss_fn(kl_weight=1e-3, object_weight=0.0)(vae, (images, ["a", "b"]))  # L2
    assert set(terms) == {"loss", "reconstruction", "kl"}
    torch.manual_seed(1)  # the same ε: z = μ + σ·ε is drawn from torch's global generator
    posterior = vae.encode(images)
    expected = vae_loss(images, vae.decode(posterior.sample()), posterior, 1e-3, "l2")
    for key, value in expected._asdict().items():
        torch.testing.assert_close(terms[key], value)
    assert terms["loss"].item() == pytest.approx(
        terms["reconstruction"].item() + 1e-3 * terms["kl"].item(), rel=1e-6)


def test_object_mask_covers_the_object_and_its_edge():
    background = torch.full((1, 3, 12, 12), 0.9)
    background[:, :, 4:7, 5:8] = torch.tensor([0.8, -0.8, -0.8]).view(1, 3, 1, 1)  # red 3×3
    expected = torch.zeros(1, 1, 12, 12)
    expected[:, :, 4:7, 5:8] = 1.0
    torch.testing.assert_close(object_mask(background, margin=0), expected, rtol=0, atol=0)
    expected[:, :, 2:9, 3:10] = 1.0  # the object grown by two pixels
    torch.testing.assert_close(object_mask(background, margin=2), expected, rtol=0, atol=0)
    assert object_mask(torch.zeros(2, 3, 8, 8)).sum() == 0  # a flat picture has no objects


def test_loss_fn_weighs_object_pixels():
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_config())
    images = torch.stack([WorldPictures(2)[i][0] for i in range(2)])
    torch.manual_seed(1)
    terms = vae_loss_fn(kl_weight=1e-3, object_weight=9.0, object_margin=3)(vae, (images, ["", ""]))
    torch.manual_seed(1)
    posterior = vae.encode(images)
    weight = 1 + 9.0 * object_mask(images, margin=3)
    expected = vae_loss(images, vae.decode(posterior.sample()), posterior, 1e-3, "l2", weight)
    torch.testing.assert_close(terms["reconstruction"], expected.reconstruction)
    torch.manual_seed(1)
    plain = vae_loss_fn(kl_weight=1e-3, object_weight=0.0)(vae, (images, ["", ""]))
    assert plain["reconstruction"] < terms["reconstruction"]


class FixedLatents(nn.Module):
    """A stand-in VAE whose posterior mean is `values`, with σ = exp(−15) ≈ 3e-7."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def encode(self, x):
        mean = self.values[:len(x)]
        return DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], 1))


def test_latent_std_is_the_std_of_all_latent_elements():
    values = torch.tensor([1.0, 3.0, 5.0, 7.0]).reshape(1, 4, 1, 1).repeat(3, 1, 2, 2)
    std = latent_std(FixedLatents(values), ShapesDataset("train", 3), batch_size=2)
    # 12 copies each of 1, 3, 5, 7: mean 4, unbiased variance 240/47
    assert std == pytest.approx(math.sqrt(240 / 47), rel=1e-6)


def test_psnr_exact_values():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.2  # 0.1 in [0, 1] everywhere: MSE 0.01, 20 dB
    y[1, :, :2] = 2.0  # clamped to 1.0: 0.5 in [0, 1] on half the pixels: MSE 0.125
    values = psnr(x, y)
    torch.testing.assert_close(values, torch.tensor([20.0, 10 * math.log10(8.0)]))
    assert psnr(x, x).isinf().all()


class Identity(nn.Module):
    """A perfect 'VAE': z = x, decode(z) = z."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return DiagonalGaussianDistribution(torch.cat([x, torch.full_like(x, -30.0)], 1))

    def decode(self, z):
        return z


class Blank(Identity):
    """Decodes everything to a flat mid-gray picture."""

    def decode(self, z):
        return torch.zeros_like(z)


def test_evaluation_of_a_perfect_and_a_blank_reconstruction():
    perfect = evaluate_reconstructions(Identity(), num_samples=10, batch_size=4)
    assert perfect["psnr"] == math.inf and perfect["num_samples"] == 10
    assert perfect["judge_reconstruction"] == perfect["judge_original"]
    assert set(perfect["agreement"].values()) == {1.0}
    assert {"count", "colour", "shape", "size", "position", "background"} <= set(
        perfect["agreement"])

    blank = evaluate_reconstructions(Blank(), num_samples=10, batch_size=4)
    assert blank["judge_reconstruction"]["count"] == 0.0  # nothing stands out from gray
    assert blank["agreement"]["count"] == 1 - blank["judge_original"]["count"]
    assert blank["psnr"] < 15
    table = format_evaluation(blank)
    assert "reconstruction PSNR on 10 test pictures" in table and "count" in table


# The interpolation picture


def test_draw_latent_interpolation_decodes_the_blended_means():
    """Top row: a, the pixel crossfade, b; bottom row: the decoded means of a, of the blended
    means, and of b."""
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_config()).eval()
    data = ShapesDataset("test", 2)
    a, b = data[0][0], data[1][0]
    for t in (0.0, 0.25):
        fig = viz.draw_latent_interpolation(vae, a, b, t)
        panels = [torch.as_tensor(ax.images[0].get_array()) for ax in fig.axes if ax.images]
        viz.plt.close(fig)
        with torch.no_grad():
            means = vae.encode(torch.stack([a, b])).mode()
            decoded = vae.decode(torch.stack([means[0], (1 - t) * means[0] + t * means[1],
                                              means[1]]))
        assert len(panels) == 6
        for panel, picture in zip(panels, [a, (1 - t) * a + t * b, b, *decoded]):
            torch.testing.assert_close(panel, torch.as_tensor(viz.to_image(picture)),
                                       rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        viz.draw_latent_interpolation(vae, a, b, 1.5)


@pytest.mark.skipif(not BUNDLED_VAE.is_dir(), reason="the bundled VAE is trained by "
                    "`python -m minisd.training vae`")
def test_bundled_vae_reconstructs_what_the_judge_reads():
    vae = AutoencoderKL.from_pretrained(BUNDLED_VAE).eval()
    assert vae.scaling_factor == pytest.approx(0.523347, abs=1e-6)
    results = evaluate_reconstructions(vae, 64)
    assert results["psnr"] >= BUNDLED_PSNR_64 - 0.5, results["psnr"]
    for attribute, share in results["agreement"].items():
        assert share >= 0.95, (attribute, results["agreement"])
