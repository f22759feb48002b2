"""What a run of the pipeline owns and where its settings come from: one generator per picture,
its own scheduler state, the model's sampling defaults, and its arguments checked before any
work."""

import json
import logging

import diffusers
import pytest
import torch
from conftest import SD_SCHEDULE, StandInUNet, tiny_pipeline

from minisd.package_data import bundled_model
from minisd.pipeline import SamplingDefaults, StableDiffusionPipeline
from minisd.schedulers import SCHEDULERS, from_name

NAMES = list(SCHEDULERS)
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def pictures(pipe, **kwargs):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 7.5, "output_type": "pt",
              "progress": False, **kwargs}
    return pipe(PROMPT, **kwargs).images


# ---- one generator per picture


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("img2img", [False, True], ids=["text2img", "img2img"])
def test_picture_i_of_a_batch_equals_the_run_of_generator_i_alone(pipe, name, img2img):
    """Generators seeded 10, 11, 12 for a batch of three: picture i is the one generator i
    draws alone (max pixel difference < 1e-3) — its starting noise, its ancestral noise (DDPM,
    Euler ancestral) and, for img2img, its sample of the VAE posterior."""
    extra = {"scheduler": name}
    if img2img:
        image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        extra |= {"image": image, "strength": 0.75}
    batch = pictures(pipe, num_images_per_prompt=3,
                     generator=[torch.Generator().manual_seed(10 + i) for i in range(3)],
                     **extra)
    for i in range(3):
        alone = pictures(pipe, generator=torch.Generator().manual_seed(10 + i), **extra)
        assert (batch[i] - alone[0]).abs().max() < 1e-3, i
    assert (batch[0] - batch[1]).abs().max() > 1e-2          # and the three differ


def test_img2img_posterior_sample_comes_from_each_pictures_generator(pipe):
    """With the strength at 0 the picture's latents come back: with generators [10, 11, 12],
    latent i is the VAE posterior sampled with generator i."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = pipe(PROMPT, image=image, strength=0.0, num_images_per_prompt=3,
                   generator=[torch.Generator().manual_seed(10 + i) for i in range(3)],
                   output_type="latent", progress=False).images
    for i in range(3):
        expected = pipe.vae.encode_latents(image[None], torch.Generator().manual_seed(10 + i))
        torch.testing.assert_close(latents[i:i + 1], expected, atol=0, rtol=0)


# ---- each run owns its scheduler state


@pytest.mark.parametrize("name", NAMES)
def test_interleaved_runs_equal_runs_one_after_the_other(pipe, name):
    """Two `denoising_steps` generators on the pipeline's own scheduler, stepped in turn, give
    exactly the latents of each run alone (DPM-Solver++ keeps the previous x̂_0 between steps:
    a shared scheduler mixed the two runs' histories)."""
    own = StableDiffusionPipeline(**{**pipe.components, "scheduler": from_name(name, SD_SCHEDULE)})

    def run(**kwargs):
        return own.denoising_steps(progress=False, **kwargs)

    a = run(prompt=PROMPT, seed=1, num_inference_steps=6)
    b = run(prompt="blue", seed=2, image=torch.zeros(3, 64, 64), strength=0.8,
            num_inference_steps=5)           # another grid, entered part-way down
    interleaved_a, interleaved_b = [], []
    for state_a in a:                       # a step of run a, then one of run b
        interleaved_a.append(state_a.latents)
        state_b = next(b, None)
        if state_b is not None:
            interleaved_b.append(state_b.latents)
    solo_a = [s.latents for s in run(prompt=PROMPT, seed=1, num_inference_steps=6)]
    solo_b = [s.latents for s in run(prompt="blue", seed=2, image=torch.zeros(3, 64, 64),
                                     strength=0.8, num_inference_steps=5)]
    assert len(interleaved_a) == 6 and len(interleaved_b) == 4
    for got, expected in zip(interleaved_a + interleaved_b, solo_a + solo_b, strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_run_inside_another_runs_callback_leaves_it_unchanged(pipe):
    """A call made from another call's callback (a notebook preview, say) runs on its own copy
    of the pipeline's scheduler too."""
    run = {"num_inference_steps": 5, "seed": 3, "output_type": "latent", "progress": False}
    solo = pipe(PROMPT, **run).images
    nested = pipe(PROMPT, callback=lambda state: pipe("blue", **run), **run).images
    torch.testing.assert_close(nested, solo, atol=0, rtol=0)


def test_the_callers_scheduler_is_not_modified(pipe):
    scheduler = from_name("dpmpp_2m", SD_SCHEDULE)
    pipe(PROMPT, scheduler=scheduler, num_inference_steps=3, seed=0, progress=False)
    assert scheduler.timesteps is None and pipe.scheduler.timesteps is None


# ---- the model's sampling defaults


def test_a_model_without_sampling_defaults_gets_diffusers_defaults(pipe):
    assert pipe.sampling_defaults == SamplingDefaults(guidance_scale=7.5, num_inference_steps=50)


def test_the_bundled_model_carries_the_settings_it_was_judged_at():
    """The model card's judge ran 25 DDIM steps on the trailing grid at guidance 2.5, with the
    zero-terminal-SNR schedule and v-prediction the U-Net was trained with."""
    defaults = SamplingDefaults.from_model_index(bundled_model() / "model_index.json")
    assert defaults == SamplingDefaults(guidance_scale=2.5, num_inference_steps=25)
    config = json.loads((bundled_model() / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler"
    assert (config["rescale_betas_zero_snr"], config["prediction_type"],
            config["timestep_spacing"], config["steps_offset"]) == (True, "v_prediction",
                                                                    "trailing", 0)


def test_sampling_defaults_are_saved_loaded_and_used_when_a_call_gives_none(tmp_path):
    """guidance 1 and 3 steps, saved in model_index.json: a call with neither runs 3 steps of
    one unguided U-Net pass; given values still win."""
    tiny = tiny_pipeline()
    tiny.sampling_defaults = SamplingDefaults(guidance_scale=1.0, num_inference_steps=3)
    folder = tiny.save_pretrained(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_sampling_defaults"] == {"guidance_scale": 1.0, "num_inference_steps": 3}
    loaded = StableDiffusionPipeline.from_pretrained(folder, device="cpu")
    assert loaded.sampling_defaults == tiny.sampling_defaults
    batches = []
    hook = loaded.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        loaded(PROMPT, seed=0, output_type="latent", progress=False)
        assert batches == [1, 1, 1]
        assert [s.num_steps for s in loaded.denoising_steps(PROMPT, seed=0, progress=False)] \
            == [3, 3, 3]
        batches.clear()
        loaded(PROMPT, seed=0, num_inference_steps=2, guidance_scale=7.5, output_type="latent",
               progress=False)
        assert batches == [2, 2]
    finally:
        hook.remove()


def test_diffusers_loads_a_folder_with_sampling_defaults_without_a_word(tmp_path, capfd):
    """The underscore keeps diffusers' loader quiet: it says nothing about _sampling_defaults,
    while the same key without the underscore draws its 'not expected' warning."""
    folder = tiny_pipeline().save_pretrained(tmp_path / "model")
    diffusers.utils.logging.set_verbosity_warning()
    try:
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("diffusers").addHandler(handler)
        diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        quiet = [r.getMessage() for r in records] + [capfd.readouterr().err]
        index = json.loads((folder / "model_index.json").read_text())
        index["sampling_defaults"] = index.pop("_sampling_defaults")
        (folder / "model_index.json").write_text(json.dumps(index))
        records.clear()
        diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        loud = [r.getMessage() for r in records] + [capfd.readouterr().err]
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        diffusers.utils.logging.set_verbosity_error()
    assert not any("sampling_defaults" in message for message in quiet), quiet
    assert any("sampling_defaults" in message for message in loud), loud


@pytest.mark.parametrize("value, message", [
    ({"guidance_scale": "high"}, "guidance_scale must be a finite number, got 'high'"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number ≥ 1, got 0"),
    ({"steps": 25}, "must be an object with the keys guidance_scale and num_inference_steps"),
    ([4.0, 25], "must be an object with the keys"),
])
def test_sampling_defaults_that_do_not_fit_name_the_file_and_the_key(tmp_path, value, message):
    path = tmp_path / "model_index.json"
    path.write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                "_sampling_defaults": value}))
    with pytest.raises(ValueError, match=f"{path}: _sampling_defaults.*{message}"):
        SamplingDefaults.from_model_index(path)


# ---- arguments checked before any work


@pytest.mark.parametrize("kwargs, message", [
    ({"num_inference_steps": 1000, "scheduler": "ddim"},
     "grid can give: leading spacing with steps_offset=1 .* at most 999"),
    ({"height": 10 ** 6, "width": 10 ** 6}, r"need at least [\d,.]+ GiB .* more than the"),
    ({"num_images_per_prompt": 10 ** 9}, r"1000000000 picture\(s\) of 64×64 need at least"),
    ({"generator": [torch.Generator(), torch.Generator()]}, "2 generators for a batch of 1"),
    ({"image": torch.zeros(3, 0, 64)}, "H, W ≥ 1"),
    ({"image": torch.zeros(3, 64, 64), "strength": float("nan")}, "strength must lie in"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    """check_inputs runs first: neither the text encoder nor the U-Net is ever called."""
    tiny = tiny_pipeline()
    unet = StandInUNet(tiny.unet.config)
    pipe = StableDiffusionPipeline(tiny.vae, tiny.text_encoder, tiny.tokenizer, unet,
                                   tiny.scheduler)
    encoded = []
    pipe.text_encoder.register_forward_hook(lambda *args: encoded.append(1))
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, progress=False, **{"num_inference_steps": 2, **kwargs})
    with pytest.raises(ValueError, match=message):
        pipe.check_inputs(PROMPT, **{"num_inference_steps": 2, **kwargs})
    assert encoded == [] and unet.calls == []


def test_memory_estimate_is_the_vae_decodes_full_size_tensors(pipe):
    """The tiny VAE's second level has 8 channels: three float32 (B, 8, H, W) tensors and the
    float32 picture, 3·8·4 + 3·4 = 108 bytes per pixel: 2 pictures of 64×64 need 884,736."""
    assert pipe.memory_estimate(2, 64, 64) == 884_736
