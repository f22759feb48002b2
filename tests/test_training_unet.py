"""The U-Net's training recipe (minisd.training.unet): the loss, caption dropout, the cache, the
saved folder (read back by minisd, diffusers and the pipeline), the `all` command, and the
committed bundled model's pictures as judged by minisd.shapes.evaluate."""

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from minisd.noise import NoiseSchedule
from minisd.package_data import data_dir
from minisd.pipeline import StableDiffusionPipeline
from minisd.shapes.evaluate import evaluate, pipeline_generate_fn
from minisd.shapes.world import ShapesDataset, evaluation_prompts
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode
from minisd.training import unet as recipe
from minisd.training.loop import TARGETS, TrainConfig, main
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig

SD_V1 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000}


def tiny_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with the 512 byte symbols, a few merges and the specials (521 ids)."""
    symbols = list(bytes_to_unicode().values())
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>", "circ le</w>"]
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges),
              BOS, EOS]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges)


@pytest.fixture(scope="module")
def parts_folder(tmp_path_factory):
    """A model folder with a tiny random VAE (f = 4: 64×64 → 16×16×4), text encoder (width 16)
    and tokenizer: what `train_unet` needs before the U-Net exists."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, sample_size=64,
        scaling_factor=0.5)).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 3, "batch_size": 8, "progress": False, "device": "cpu",
                          "ema_decay": 0.9, "warmup_steps": 1, **overrides})


def test_recipe_trains_and_saves_a_folder_everyone_loads(parts_folder, tmp_path):
    unet = recipe.train_unet(quiet(out_dir=str(tmp_path / "runs")), model=parts_folder,
                             output=parts_folder, block_out_channels=(8, 16, 16),
                             attention_head_dim=(1, 2, 2), train_samples=16,
                             cache_dir=tmp_path / "cache")
    folder = parts_folder
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    assert config["cross_attention_dim"] == 16 and config["sample_size"] == 16
    assert config["only_cross_attention"] == [True, False, False]
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    for name, value in unet.state_dict().items():  # the saved weights are the returned EMA's
        torch.testing.assert_close(weights[name], value.half(), rtol=0, atol=0)

    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert {k: scheduler[k] for k in SD_V1} == SD_V1
    assert (scheduler["set_alpha_to_one"], scheduler["steps_offset"],
            scheduler["clip_sample"], scheduler["prediction_type"]) == (False, 1, False, "epsilon")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (folder / "unet_loss.png").stat().st_size > 1000

    ours = UNet2DConditionModel.from_pretrained(folder / "unet").float().eval()
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet",
                                                            torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([10, 900]), context),
                                   theirs(x, torch.tensor([10, 900]), context).sample,
                                   rtol=1e-4, atol=1e-4)

    pipe = StableDiffusionPipeline.from_pretrained(folder, device="cpu")
    images = pipe("a red circle", num_inference_steps=2, seed=0, output_type="pt",
                  progress=False).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_encoding_is_cached_and_reused(parts_folder, tmp_path, monkeypatch):
    first = recipe.cached_encoding(parts_folder, 12, seed=0, cache_dir=tmp_path, progress=False)
    latents, context, empty = first
    assert latents.shape == (12, 4, 16, 16) and context.shape == (12, 77, 16)
    assert empty.shape == (77, 16)
    assert {t.dtype for t in first} == {torch.float16}
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again instead of reading the cache")
    monkeypatch.setattr(recipe, "encode_dataset", no_encoding)
    again = recipe.cached_encoding(parts_folder, 12, seed=0, cache_dir=tmp_path, progress=False)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="encoded again"):  # another set: another key
        recipe.cached_encoding(parts_folder, 10, seed=0, cache_dir=tmp_path, progress=False)


def test_encoding_matches_the_parts(parts_folder):
    """Latents are the VAE's scaled posterior samples, contexts the text encoder's last
    hidden state of the 77 ids (as the pipeline computes them)."""
    vae, text_encoder, tokenizer = recipe.load_frozen_parts(parts_folder)
    data = ShapesDataset("train", 4, seed=0)
    latents, context = recipe.encode_dataset(vae, text_encoder, tokenizer, data, seed=0,
                                             progress=False)
    images = torch.stack([data[i][0] for i in range(4)])
    expected = vae.encode_latents(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, expected.half())
    with torch.no_grad():
        hidden = text_encoder(tokenizer([data[i][1] for i in range(4)])).last_hidden_state
    torch.testing.assert_close(context, hidden.half())


class RecordingUNet(torch.nn.Module):
    """Returns zeros and records what it was called with."""

    def forward(self, sample, timestep, encoder_hidden_states):
        self.calls = (sample, timestep, encoder_hidden_states)
        return torch.zeros_like(sample)


def test_loss_is_epsilon_prediction_mse():
    """One step of Ho et al. 2020, Algorithm 1, replayed by hand from the same random numbers:
    z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε with t ~ U{0..999}, and the loss ‖ε − ε_θ‖² (here ε_θ = 0,
    so the loss is the mean of ε²)."""
    schedule = NoiseSchedule(**SD_V1)
    empty = torch.full((77, 8), -1.0)
    z0, context = torch.randn(6, 4, 16, 16), torch.randn(6, 77, 8)
    unet = RecordingUNet()
    torch.manual_seed(3)
    loss = recipe.noise_prediction_loss(schedule, empty, uncond_prob=0.5)(
        unet, (z0.half(), context))
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (6,))
    noise = torch.randn(6, 4, 16, 16)
    drop = torch.rand(6) < 0.5
    ac = schedule.alphas_cumprod[t].reshape(6, 1, 1, 1)
    sample, timestep, seen_context = unet.calls
    torch.testing.assert_close(timestep, t)
    torch.testing.assert_close(sample, ac.sqrt() * z0.half().float() + (1 - ac).sqrt() * noise)
    torch.testing.assert_close(loss, noise.pow(2).mean())
    torch.testing.assert_close(seen_context, torch.where(drop[:, None, None], empty, context))


def test_caption_dropout_rate():
    torch.manual_seed(0)
    n = 20_000
    context, empty = torch.randn(n, 3, 2), torch.zeros(3, 2)
    out = recipe.drop_captions(context, empty, 0.1)
    dropped = (out == 0).all(dim=(1, 2))
    # binomial(20000, 0.1): standard deviation 0.0021, so ±0.0085 is four of them
    assert abs(dropped.float().mean().item() - 0.1) < 0.0085
    torch.testing.assert_close(out[~dropped], context[~dropped], rtol=0, atol=0)
    assert recipe.drop_captions(context, empty, 0.0) is context
    assert (recipe.drop_captions(context, empty, 1.0) == 0).all()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        recipe.drop_captions(context, empty, 1.5)


def test_bundled_config_attends_only_to_text_at_16x16():
    config = recipe.bundled_unet_config(cross_attention_dim=128)
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
    assert sum(p.numel() for p in unet.parameters()) == 897_700
    cross = {n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}
    selfs = {n for n, m in unet.named_modules()
             if hasattr(m, "is_cross_attention") and n not in cross}
    assert all(n.startswith(("down_blocks.1", "mid_block", "up_blocks.1")) for n in selfs)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in cross
    assert not any(n.startswith(("down_blocks.2", "up_blocks.0")) for n in cross | selfs)


def test_missing_parts_say_what_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m minisd.training vae"):
        recipe.load_frozen_parts(tmp_path)


def test_all_runs_the_stages_in_order(monkeypatch, tmp_path):
    from minisd.training import clip, vae  # noqa: F401  (they register clip and vae)
    calls = []
    for stage in recipe.STAGES:
        monkeypatch.setattr(TARGETS[stage], "run",
                            lambda config, args, stage=stage: calls.append((stage, config, args)))
    main(["all", "--output", str(tmp_path), "--seed", "3", "--no-progress", "--device", "cpu"])
    assert [c[0] for c in calls] == ["vae", "clip", "unet"]
    (_, vae_config, vae_args), (_, clip_config, clip_args), (_, unet_config, unet_args) = calls
    assert vae_args.output == str(tmp_path / "vae") and clip_args.output == str(tmp_path)
    assert unet_args.output == str(tmp_path) and unet_args.model == str(tmp_path)
    assert unet_config.steps == recipe.DEFAULTS.steps and unet_config.lr == recipe.DEFAULTS.lr
    assert vae_config.name == "vae" and clip_config.name == "clip"
    assert {c.seed for _, c, _ in calls} == {3} and not any(c.progress for _, c, _ in calls)
    with pytest.raises(ValueError, match="--steps, --lr"):
        main(["all", "--steps", "5", "--lr", "0.1"])


# ---- the committed bundled model ----

# Measured on the committed model (see data/minisd-shapes/README.md): the first 12 test prompts,
# 10 DDIM steps, the model's own guidance (4), seeds 0…11.
MEASURED = {"colour": 0.833, "shape": 0.667, "position": 1.0}
MARGIN = 0.25


@pytest.mark.skipif(not (data_dir() / "minisd-shapes" / "unet").is_dir(), reason="the bundled U-Net is trained "
                    "by `python -m minisd.training unet`")
def test_bundled_model_draws_what_the_prompt_says():
    pipe = StableDiffusionPipeline.from_pretrained(device="cpu")
    results = evaluate(pipeline_generate_fn(pipe, 10), evaluation_prompts(12),
                       batch_size=12, progress=False, print_table=False)
    for name, measured in MEASURED.items():
        assert results["all"][name] >= measured - MARGIN, (name, results["all"])
