"""StableDiffusionPipeline: parity with diffusers on the same tiny random weights, seeds, output types, img2img, the step generator and bad input."""

import copy
import sys
import warnings

import diffusers
import numpy as np
import pytest
import torch
from conftest import SD_SCHEDULE, tiny_pipeline
from PIL import Image
from torch import nn

from minisd import package_data
from minisd import pipeline as pipeline_module
from minisd.pipeline import StableDiffusionPipeline, StepState
from minisd.schedulers import from_name, sigmas_from_alphas_cumprod

# SD v1's noise schedule (runwayml/stable-diffusion-v1-5 scheduler_config.json)
PROMPTS = ["a red circle", "blue"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """diffusers' StableDiffusionPipeline reading the same weights from minisd's folder."""
    folder = pipe.save_pretrained(tmp_path_factory.mktemp("tiny"))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def diffusers_scheduler(ours, tmp_path):
    """The diffusers scheduler of the same class, from minisd's saved config."""
    ours.save_pretrained(tmp_path)
    return getattr(diffusers, type(ours).__name__).from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "euler_ancestral", "ddim", "ddpm"])
def test_parity_with_diffusers(pipe, reference, name, tmp_path):
    """Same weights, scheduler config, starting noise and generator: the same pictures,
    with guidance, negative prompts and two pictures per prompt."""
    scheduler = from_name(name, SD_SCHEDULE, timestep_spacing="leading")
    reference.scheduler = diffusers_scheduler(scheduler, tmp_path)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = {"negative_prompt": ["le", ""], "num_inference_steps": 6, "guidance_scale": 7.5,
              "num_images_per_prompt": 2, "latents": noise, "output_type": "pt"}
    expected = reference(PROMPTS, generator=torch.Generator().manual_seed(5), **kwargs).images
    ours = pipe(PROMPTS, scheduler=scheduler, progress=False,
                generator=torch.Generator().manual_seed(5), **kwargs).images
    assert ours.shape == (4, 3, 64, 64)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_img2img_parity_with_diffusers(pipe, reference, name, tmp_path):
    scheduler = from_name(name, SD_SCHEDULE)
    ref = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    ref.scheduler = diffusers_scheduler(scheduler, tmp_path)
    ref.set_progress_bar_config(disable=True)
    pixels = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())
    kwargs = {"image": image, "strength": 0.6, "num_inference_steps": 10, "output_type": "pt"}
    expected = ref("a red circle", generator=torch.Generator().manual_seed(5), **kwargs).images
    ours = pipe("a red circle", scheduler=scheduler, progress=False,
                generator=torch.Generator().manual_seed(5), **kwargs).images
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


class OracleUNet(nn.Module):
    """A stub U-Net that knows the answer: for a fixed x_0 of unit variance it returns the
    exact noise of its input x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, and records the input's std.
    ᾱ at a fractional t comes from σ interpolated linearly in t (as the Euler grid does)."""

    def __init__(self, config, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1))   # gives the pipeline a device and dtype
        self.x0, self.sigmas = x0, sigmas_from_alphas_cumprod(alphas_cumprod.double())
        self.stds = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.stds.append(sample.std().item())
        t = float(timestep)
        lo = min(int(t), len(self.sigmas) - 2)
        sigma = self.sigmas[lo] + (t - lo) * (self.sigmas[lo + 1] - self.sigmas[lo])
        alpha_bar = 1 / (sigma ** 2 + 1)
        x0 = self.x0.repeat(sample.shape[0] // self.x0.shape[0], 1, 1, 1)
        return ((sample - alpha_bar ** 0.5 * x0) / (1 - alpha_bar) ** 0.5).float()


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_unet_input_has_unit_std_at_every_step(pipe, name):
    """The starting noise is scaled by init_noise_sigma (≈ 14.6 for Euler) and every
    U-Net input by 1/√(σ² + 1): the U-Net sees std ≈ 1 at every step."""
    scheduler = from_name(name, SD_SCHEDULE)
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    oracle = OracleUNet(pipe.unet.config, x0, scheduler.alphas_cumprod)
    stub = StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, oracle,
                                   scheduler)
    stub("a red circle", height=256, width=256, num_inference_steps=20, seed=0,
         output_type="latent", progress=False)
    if name == "euler":
        assert scheduler.init_noise_sigma == pytest.approx(14.6146, abs=1e-3)
    assert len(oracle.stds) == 20
    assert all(abs(s - 1) < 0.05 for s in oracle.stds), oracle.stds


def test_one_unet_call_per_step(pipe):
    """Scale 1 runs the U-Net once per step on the prompts only; any other scale runs one
    batched call on [negative, positive] per step."""
    batches = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, seed=0, output_type="latent",
             progress=False)
        assert batches == [2] * 4
        batches.clear()
        pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, seed=0, output_type="latent",
             progress=False)
        assert batches == [4] * 4
    finally:
        hook.remove()


def test_scale_0_is_the_unconditional_model(pipe):
    """s = 0 gives ε_u: the prompt is ignored, as with prompt = negative at s = 1 (equal up to
    float rounding: a batch of 2 and a batch of 1 round differently)."""
    run = {"num_inference_steps": 5, "seed": 3, "output_type": "latent", "progress": False}
    unconditional = pipe("a red circle", negative_prompt="le", guidance_scale=0.0, **run)
    same = pipe("le", guidance_scale=1.0, **run)
    torch.testing.assert_close(unconditional.images, same.images, atol=1e-4, rtol=0)


def test_half_precision_decode_overflow_is_redone_in_float32():
    """Latents of constant 30 through a decoder block that overflows float16 give inf/NaN
    in half precision; the pipeline notices, warns and decodes in float32, giving a picture
    that is finite and equals the float32 decode (not a black one)."""
    pipe = tiny_pipeline().to(dtype=torch.float16)
    latents = torch.full((1, 4, 8, 8), 30.0, dtype=torch.float16)
    normal = pipe.decode(torch.randn(1, 4, 8, 8, dtype=torch.float16), "pt")
    assert torch.isfinite(normal).all()                  # no false alarm without overflow
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.fill_(1000.0)    # 36 inputs × 1000 × 165 > 65,504
    assert not torch.isfinite(pipe.vae.decode_latents(latents)).all()
    with pytest.warns(UserWarning, match="overflowed in torch.float16.*float32"):
        images = pipe.decode(latents, "pt")
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    expected = copy.deepcopy(pipe.vae).float().decode_latents(latents.float())
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))
    assert images.std() > 0.01                            # a picture, not a constant
    assert next(pipe.vae.parameters()).dtype == torch.float16   # the pipeline stays in fp16


def test_nan_latents_are_an_error_not_a_black_picture(pipe):
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*float32"):
        pipe.decode(latents, "pil")


def test_same_seed_same_picture(pipe):
    run = {"num_inference_steps": 4, "output_type": "pt", "progress": False}
    a = pipe("a red circle", seed=11, **run).images
    b = pipe("a red circle", seed=11, **run).images
    c = pipe("a red circle", generator=torch.Generator("cpu").manual_seed(11), **run).images
    d = pipe("a red circle", seed=12, **run).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    assert (a - d).abs().max() > 1e-3


def test_output_types(pipe):
    run = {"num_inference_steps": 3, "seed": 0, "progress": False}
    pil = pipe(PROMPTS, **run).images
    pt = pipe(PROMPTS, output_type="pt", **run).images
    latents = pipe(PROMPTS, output_type="latent", **run).images
    assert [(im.size, im.mode) for im in pil] == [((64, 64), "RGB")] * 2
    assert pt.shape == (2, 3, 64, 64) and pt.dtype == torch.float32
    assert 0 <= pt.min() and pt.max() <= 1
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(pipe.decode(latents, "pt"), pt, atol=0, rtol=0)
    pixels = torch.from_numpy(np.asarray(pil[0])).float()
    torch.testing.assert_close(pixels, (pt[0].permute(1, 2, 0) * 255).round(), atol=0, rtol=0)


def test_denoising_steps_yield_every_step(pipe):
    states = list(pipe.denoising_steps("a red circle", num_inference_steps=5, seed=2,
                                       progress=False))
    assert [s.step for s in states] == list(range(5))
    assert all(isinstance(s, StepState) and s.num_steps == 5 for s in states)
    assert all(s.latents.shape == s.pred_original_sample.shape == (1, 4, 8, 8)
               for s in states)
    timesteps = [s.timestep.item() for s in states]
    assert timesteps == sorted(timesteps, reverse=True)
    final = pipe("a red circle", num_inference_steps=5, seed=2, output_type="latent",
                 progress=False).images
    torch.testing.assert_close(states[-1].latents, final, atol=0, rtol=0)
    seen = []
    pipe("a red circle", num_inference_steps=5, seed=2, output_type="latent", progress=False,
         callback=seen.append)
    assert [s.step for s in seen] == list(range(5))


def test_img2img_strength(pipe):
    """strength 0 runs no step and returns the picture's latents; strength s runs int(s·n)
    of the n steps (as diffusers)."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    counted = []
    kept = pipe("a red circle", image=image, strength=0.0, num_inference_steps=10, seed=4,
                output_type="latent", progress=False, callback=counted.append).images
    expected = pipe.vae.encode_latents(image[None], torch.Generator().manual_seed(4))
    assert counted == []
    torch.testing.assert_close(kept, expected, atol=0, rtol=0)
    for strength, steps in ((0.5, 5), (1.0, 10)):
        counted.clear()
        pipe("a red circle", image=image, strength=strength, num_inference_steps=10, seed=4,
             output_type="latent", progress=False, callback=counted.append)
        assert len(counted) == steps


def test_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="dropped"):
        out = pipe(" ".join(["red"] * 100), num_inference_steps=2, seed=0, progress=False,
                   output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)


def test_progress_false_writes_nothing(pipe, capfd):
    pipe("a red circle", num_inference_steps=3, seed=0, progress=False)
    assert capfd.readouterr() == ("", "")
    pipe("a red circle", num_inference_steps=3, seed=0, progress=True)
    assert "3/3" in capfd.readouterr().err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"height": 60}, "multiples of 8.*56 or 64"),
    ({"width": 100}, "multiples of 8.*96 or 104"),
    ({"prompt": PROMPTS, "negative_prompt": ["x", "y", "z"]}, "2 prompt.*3 negative"),
    ({"prompt": []}, "empty"),
    ({"num_inference_steps": 0}, "num_inference_steps.*≥ 1"),
    ({"image": torch.zeros(3, 64, 64), "strength": 1.5}, r"strength must lie in \[0, 1\]"),
    ({"image": torch.zeros(3, 64, 64), "strength": -0.1}, r"strength must lie in \[0, 1\]"),
    ({"image": torch.zeros(3, 60, 64)}, "multiples of 8"),
    ({"image": torch.full((3, 64, 64), 255.0)}, r"\[-1, 1\]"),
    ({"output_type": "np"}, "unknown output_type 'np'"),
    ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
    ({"latents": torch.zeros(1, 4, 4, 4)}, r"latents must have shape \(1, 4, 8, 8\)"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"scheduler": "pndm"}, "unknown scheduler 'pndm'"),
    ({"height": 0}, "height must be a whole number of pixels, at least 8"),
    ({"width": -8}, "width must be a whole number of pixels"),
    ({"height": 64.0}, "height must be a whole number of pixels"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": "7"}, "guidance_scale must be a finite number"),
    ({"seed": 2 ** 70}, r"seed must be a whole number in \[0, 2\*\*63\)"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"strength": 0.5}, "strength=0.5 is for img2img: pass the starting picture as image="),
])
def test_bad_input_raises_clear_errors(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize("generator", [0, [torch.Generator(), 1], "seed"])
def test_a_generator_that_is_not_a_torch_generator_is_refused(pipe, generator):
    with pytest.raises(TypeError, match="generator must be a torch.Generator or a list of them"):
        pipe("a red circle", generator=generator, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("prompt", [None, 123, b"a red circle"])
def test_prompts_that_are_not_strings_are_refused(pipe, prompt):
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
        pipe(prompt, num_inference_steps=2, progress=False)
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
        pipe("a red circle", negative_prompt=5, num_inference_steps=2, progress=False)


def test_from_pretrained_defaults_to_the_bundled_model(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(package_data, "data_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="the bundled model is missing .* train it with "
                                                "`python -m minisd.training all`"):
        StableDiffusionPipeline.from_pretrained()
    pipe.save_pretrained(tmp_path / "minisd-shapes")
    loaded = StableDiffusionPipeline.from_pretrained(device="cpu")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    run = {"num_inference_steps": 3, "seed": 0, "output_type": "pt", "progress": False}
    torch.testing.assert_close(loaded("a red circle", **run).images,
                               pipe("a red circle", **run).images, atol=1e-6, rtol=0)


def test_hub_ids_need_huggingface_hub_and_the_network(tmp_path, monkeypatch):
    """Nothing reaches the network: HF_HUB_OFFLINE=1 (set in conftest) and an empty cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="could not be fetched.*hf download "
                                                "someone/no-such-model"):
        StableDiffusionPipeline.from_pretrained("someone/no-such-model", device="cpu")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed.*minisd"
                                                r"\[hub\]"):
        StableDiffusionPipeline.from_pretrained("someone/no-such-model", device="cpu")


def test_from_pretrained_on_a_file_points_to_from_single_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="from_single_file"):
        StableDiffusionPipeline.from_pretrained(path)


def test_default_device_and_dtype():
    device = pipeline_module.default_device()
    expected = ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    assert device.type == expected
    assert pipeline_module.default_dtype("cuda") == torch.float16
    assert pipeline_module.default_dtype("cpu") == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_picture_on_cuda_in_float16():
    """The noise is drawn on the CPU generator and moved: CUDA in float16 (the default there)
    gives the CPU's picture up to half-precision rounding."""
    cpu = tiny_pipeline()
    cuda = tiny_pipeline().to("cuda", torch.float16)
    run = {"num_inference_steps": 5, "seed": 9, "output_type": "pt", "progress": False}
    expected = cpu("a red circle", **run).images
    images = cuda("a red circle", **run).images
    assert images.device.type == "cuda" and torch.isfinite(images).all()
    torch.testing.assert_close(images.cpu(), expected, atol=2e-2, rtol=0)


def test_runs_under_inference_mode(pipe):
    inside = []
    pipe("a red circle", num_inference_steps=2, seed=0, progress=False, output_type="latent",
         callback=lambda state: inside.append(torch.is_inference_mode_enabled()))
    assert inside == [True, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # a plain run raises no warning
        pipe("a red circle", num_inference_steps=2, seed=0, progress=False)


def test_diffusers_draws_the_bundled_model_as_minisd_does():
    """The bundled folder loads in diffusers' own StableDiffusionPipeline (zero-SNR DDIM,
    trailing grid, v-prediction from its scheduler config) and, given float32 (diffusers keeps
    the stored float16 otherwise) and the model's sampling defaults (which diffusers does not
    read), draws the same pictures as minisd."""
    folder = package_data.bundled_model()
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "DDIMScheduler"
    assert ref.scheduler.config.rescale_betas_zero_snr
    ours = StableDiffusionPipeline.from_pretrained(folder)
    defaults = ours.sampling_defaults
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"num_inference_steps": defaults.num_inference_steps,
              "guidance_scale": defaults.guidance_scale, "latents": noise, "output_type": "pt"}
    prompts = ["a yellow triangle on a black background", "a red square left of a blue circle"]
    expected = ref(prompts, **kwargs).images
    drawn = ours(prompts, progress=False, **kwargs).images
    torch.testing.assert_close(drawn, expected, atol=1e-3, rtol=0)
