"""Chapter 2: AutoencoderKL against diffusers, its checkpoints, scaling and its errors."""

import gc
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from minisd.attention import record_attention
from minisd.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution, vae_loss

SMALL = {"block_out_channels": (32, 64, 64), "down_block_types": ("DownEncoderBlock2D",) * 3,
         "up_block_types": ("UpDecoderBlock2D",) * 3, "layers_per_block": 2,
         "norm_num_groups": 16, "sample_size": 16}
# No quant convs, no mid-block attention, other channel counts and scale.
PLAIN = {"in_channels": 1, "out_channels": 2, "latent_channels": 2,
         "block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
         "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 8,
         "use_quant_conv": False, "use_post_quant_conv": False,
         "mid_block_add_attention": False, "scaling_factor": 0.5}


def reference(config: dict, seed: int = 0) -> DiffusersAutoencoderKL:
    torch.manual_seed(seed)
    return DiffusersAutoencoderKL(**config).eval()


def copied(ref: DiffusersAutoencoderKL) -> AutoencoderKL:
    ours = AutoencoderKL.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same_vae(ours, ref, x, z):
    """encode mean/logvar, a seeded sample, the KL and decode agree within 1e-5."""
    with torch.no_grad():
        p, q = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(p.mean, q.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(p.logvar, q.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(p.sample(torch.Generator().manual_seed(3)),
                                   q.sample(torch.Generator().manual_seed(3)), atol=1e-5, rtol=0)
        torch.testing.assert_close(p.kl(), q.kl(), atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_sd_v1_parameter_count():
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderKLConfig.sd_v1())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.downsampling_factor == 8 and vae.scaling_factor == 0.18215


@pytest.mark.parametrize("config", [SMALL, PLAIN], ids=["small", "plain"])
def test_parity_small_random(config):
    ref = reference(config)
    ours = copied(ref)
    c, f = ours.config.in_channels, ours.downsampling_factor
    x, z = randn(2, c, 4 * f, 2 * f), randn(2, ours.config.latent_channels, 4, 2, seed=2)
    assert_same_vae(ours, ref, x, z)


@pytest.fixture(scope="module")
def sd_v1_pair():
    config = {k: v for k, v in AutoencoderKLConfig.sd_v1().to_config().items()
              if not k.startswith("_")}
    ref = reference(config)
    pair = copied(ref), ref
    yield pair
    del pair, ref
    gc.collect()


def test_parity_sd_v1(sd_v1_pair):
    ours, ref = sd_v1_pair
    assert_same_vae(ours, ref, randn(1, 3, 32, 32), randn(1, 4, 4, 4, seed=2))


def test_mid_block_attention_is_the_shared_attention(sd_v1_pair):
    ours, _ = sd_v1_pair
    with torch.no_grad(), record_attention(ours) as rec:
        ours.decode(ours.encode(randn(1, 3, 32, 32)).mode())
    assert [name for name, _ in rec.maps] == ["encoder.mid_block.attentions.0",
                                              "decoder.mid_block.attentions.0"]
    for _, probs in rec.maps:  # one head over the 4×4 latent pixels
        assert probs.shape == (1, 1, 16, 16)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 1, 16))


def test_save_pretrained_loads_in_diffusers(tmp_path):
    ours = AutoencoderKL(AutoencoderKLConfig(**SMALL, scaling_factor=0.13025)).eval()
    ours.save_pretrained(tmp_path / "vae")
    ref = DiffusersAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert ref.config.scaling_factor == 0.13025
    assert_same_vae(ours, ref, randn(1, 3, 16, 16), randn(1, 4, 4, 4, seed=2))


def test_diffusers_folder_loads_with_from_pretrained(tmp_path):
    ref = reference(dict(SMALL, scaling_factor=0.13025))
    ref.save_pretrained(tmp_path / "model" / "vae")
    ours = AutoencoderKL.from_pretrained(tmp_path / "model", subfolder="vae").eval()
    assert next(ours.parameters()).dtype == torch.float32
    assert ours.config == AutoencoderKLConfig(**SMALL, scaling_factor=0.13025)
    assert_same_vae(ours, ref, randn(1, 3, 16, 16), randn(1, 4, 4, 4, seed=2))


def test_config_round_trip_ignores_unknown_keys():
    config = AutoencoderKLConfig(**PLAIN)
    written = config.to_config()
    assert written["_class_name"] == "AutoencoderKL"
    assert json.loads(json.dumps(written))["block_out_channels"] == [16, 32]
    assert AutoencoderKLConfig.from_config({**written, "latents_mean": None,
                                            "_diffusers_version": "0.42.0"}) == config


def test_scaling_factor_from_config_applied_once(tmp_path):
    # A config saying 0.13025 keeps 0.13025 through load and save.
    reference(dict(SMALL, scaling_factor=0.13025)).save_pretrained(tmp_path / "in")
    vae = AutoencoderKL.from_pretrained(tmp_path / "in").eval()
    assert vae.scaling_factor == 0.13025
    vae.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["scaling_factor"] == 0.13025
    x, z = randn(1, 3, 16, 16), randn(1, 4, 4, 4, seed=2)
    with torch.no_grad():
        # encode stores 0.13025 × z; decode divides by it exactly once.
        latents = vae.encode_latents(x, sample_posterior=False)
        torch.testing.assert_close(latents, 0.13025 * vae.encode(x).mean, atol=0, rtol=0)
        scaled = 0.13025 * z
        before = scaled.clone()
        torch.testing.assert_close(vae.decode_latents(scaled), vae.decode(scaled / 0.13025),
                                   atol=0, rtol=0)
        torch.testing.assert_close(vae.decode_latents(scaled), vae.decode(z), atol=1e-5, rtol=0)
        assert torch.equal(scaled, before)  # decoding leaves the caller's tensor alone
        before = z.clone()
        vae.decode(z)
        assert torch.equal(z, before)


def test_shift_factor_is_undone_exactly():
    vae = AutoencoderKL(AutoencoderKLConfig(**SMALL, scaling_factor=2.0, shift_factor=0.25))
    x, z = randn(1, 3, 16, 16), randn(1, 4, 4, 4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_latents(x, sample_posterior=False),
                                   (vae.encode(x).mean - 0.25) * 2.0, atol=0, rtol=0)
        torch.testing.assert_close(vae.decode_latents(z), vae.decode(z / 2.0 + 0.25),
                                   atol=0, rtol=0)


def test_bad_inputs_say_what_works():
    vae = AutoencoderKL(AutoencoderKLConfig(**SMALL))  # factor 4
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 4, 16, 16\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="add a batch dimension"):
        vae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 4.*got 18×16; height 16 or 20, width 16"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"height 8, width 4 would work"):
        vae.encode(torch.zeros(1, 3, 8, 2))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\).*encode it first"):
        vae.decode(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("change, message", [
    ({"norm_num_groups": 24}, r"\[32, 64, 64\] are not divisible by norm_num_groups=24"),
    ({"down_block_types": ("DownEncoderBlock2D",) * 2}, "one entry per level, got 2, 3 and 3"),
    ({"up_block_types": ("AttnUpDecoderBlock2D",) * 3}, "only 'UpDecoderBlock2D'"),
    ({"act_fn": "gelu"}, "only 'silu'"),
])
def test_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKLConfig(**{**SMALL, **change})


def test_truncated_and_foreign_state_dicts_name_the_keys():
    vae = AutoencoderKL(AutoencoderKLConfig(**SMALL))
    state = vae.state_dict()
    truncated = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    with pytest.raises(ValueError, match=r"missing keys: decoder\.conv_in\.bias"):
        vae.load_weights(truncated)
    compvis = {"first_stage_model." + k: v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"(?s)unexpected keys: first_stage_model\..*CompVis"):
        vae.load_weights(compvis)
    other = AutoencoderKL(AutoencoderKLConfig(**{**SMALL, "latent_channels": 8}))
    with pytest.raises(ValueError, match=r"(?s)encoder\.conv_out\.weight \(16, 64, 3, 3\) "
                                         r"\(model: \(8, 64, 3, 3\)\).*config"):
        vae.load_weights(other.state_dict())


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    AutoencoderKL(AutoencoderKLConfig(**SMALL)).save_pretrained(tmp_path / "vae")
    # a model folder passed alone: its vae/ is found, as with subfolder="vae"
    assert AutoencoderKL.from_pretrained(tmp_path).config == AutoencoderKLConfig(**SMALL)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ValueError, match="describes a UNet2DConditionModel"):
        AutoencoderKL.from_pretrained(tmp_path / "unet")


def test_gaussian_clamps_and_exact_kl():
    mean = torch.ones(1, 4, 2, 2)
    logvar = torch.full((1, 4, 2, 2), math.log(4.0))
    logvar[0, 0, 0, 0], logvar[0, 0, 0, 1] = 100.0, -100.0
    d = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert d.logvar[0, 0, 0, 0] == 20.0 and d.logvar[0, 0, 0, 1] == -30.0
    assert torch.equal(d.mode(), mean)
    # ½(μ² + σ² − 1 − log σ²) with μ = 1, σ² = 4: ½(4 − ln 4) per element, 14 of them.
    expected = 14 * 0.5 * (4 - math.log(4)) + 0.5 * (math.exp(20) - 20) + 0.5 * (
        math.exp(-30) + 30)
    assert d.kl().item() == pytest.approx(expected, rel=1e-6)
    zero = DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3))
    assert torch.equal(zero.kl(), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B, 2C, h, w\).*got shape \(1, 3, 2, 2\)"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def test_sample_is_reparameterised():
    params = torch.cat([torch.full((1, 2, 2, 2), 3.0), torch.zeros(1, 2, 2, 2)], dim=1)
    params.requires_grad_(True)
    d = DiagonalGaussianDistribution(params)
    z = d.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, 3.0 + eps, atol=0, rtol=0)
    z.sum().backward()  # dz/dμ = 1, dz/dlogvar = ½σε = ½ε
    torch.testing.assert_close(params.grad, torch.cat([torch.ones(1, 2, 2, 2), 0.5 * eps], 1))


def test_vae_loss_exact_values():
    x, recon = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    posterior = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 1, 1),
                                                        torch.zeros(2, 4, 1, 1)], dim=1))
    l1 = vae_loss(x, recon, posterior, kl_weight=0.5)
    assert l1.reconstruction.item() == 96.0  # 48 values of |2| per picture, batch mean
    assert l1.kl.item() == 2.0  # ½·μ² = ½ on 4 latent values
    assert l1.loss.item() == 97.0
    l2 = vae_loss(x, recon, posterior, kl_weight=1e-6, reconstruction="l2")
    assert l2.reconstruction.item() == 192.0
    assert l2.loss.item() == pytest.approx(192.0 + 2e-6, rel=1e-7)
    with pytest.raises(ValueError, match="choose 'l1' or 'l2'"):
        vae_loss(x, recon, posterior, 1e-6, reconstruction="lpips")
    with pytest.raises(ValueError, match="same shape"):
        vae_loss(x, recon[:1], posterior, 1e-6)
    with pytest.raises(ValueError, match="must be ≥ 0"):
        vae_loss(x, recon, posterior, -1.0)


def test_vae_loss_weighs_pixels():
    x, recon = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 1, 1))
    weight = torch.ones(2, 1, 4, 4)
    weight[:, :, 0, 0] = 11.0  # one pixel (3 values) of each picture counts 11 times
    terms = vae_loss(x, recon, posterior, 0.0, "l1", weight=weight)
    assert terms.reconstruction.item() == 96.0 + 3 * 10 * 2.0
    with pytest.raises(ValueError, match=r"weight of shape \(2, 1, 3, 3\) does not broadcast"):
        vae_loss(x, recon, posterior, 0.0, weight=torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        vae_loss(x, recon, posterior, 0.0, weight=torch.ones(2, 3, 4, 4, 1))


def test_forward_returns_reconstruction_and_posterior_for_the_loss():
    vae = AutoencoderKL(AutoencoderKLConfig(**{**PLAIN, "out_channels": 1}))
    x = randn(2, 1, 8, 8)
    recon, posterior = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert recon.shape == (2, 1, 8, 8) and posterior.mean.shape == (2, 2, 4, 4)
    vae_loss(x, recon, posterior, kl_weight=1e-3).loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
