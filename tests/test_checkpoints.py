"""Checkpoints: diffusers folders and original SD v1 single files, checked against diffusers'
own saving and its independent single-file conversion;; truncated and
foreign files; the user's file is never modified."""

import hashlib
import json
import shutil
import warnings

import diffusers
import pytest
import torch
import transformers
from conftest import SD_SCHEDULE, tiny_tokenizer
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from minisd import checkpoints
from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import DDIMScheduler
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig

UNET = {"sample_size": 8, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 2,
        "norm_num_groups": 4, "cross_attention_dim": 16, "attention_head_dim": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
VAE = {"block_out_channels": (8, 8, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 4,
       "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 4,
       "layers_per_block": 1, "sample_size": 64}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_unchanged(path, **kwargs) -> dict:
    """load_single_file, checking that the user's file is the same byte for byte after."""
    before = sha256(path)
    try:
        return checkpoints.load_single_file(path, **kwargs)
    finally:
        assert sha256(path) == before


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small random SD-v1-shaped pipeline built in diffusers/transformers and saved by
    diffusers' save_pretrained."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("diffusers")
    tiny_tokenizer().save_pretrained(folder / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tok")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    vae = diffusers.AutoencoderKL(**VAE).eval()
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULE)
    pipe = diffusers.StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return {"folder": folder / "model", "unet": unet, "vae": vae,
            "text_encoder": text_encoder, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def loaded(reference):
    return checkpoints.load_pretrained(reference["folder"])


@pytest.fixture(scope="module")
def single_file(loaded, tmp_path_factory):
    """minisd's components exported to the original single-file layout (flat safetensors)."""
    path = tmp_path_factory.mktemp("single") / "tiny-sd-v1.safetensors"
    return checkpoints.save_single_file(path, loaded["unet"], loaded["vae"],
                                        loaded["text_encoder"])


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(2, 4, 8, 8, generator=g),
            "pixels": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
            "context": torch.randn(2, 77, 16, generator=g),
            "t": torch.tensor([10, 700])}


def assert_same_models(a: dict, b: dict):
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = a[part].state_dict(), b[part].state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part}: {key}"


def test_diffusers_folder_loads_with_the_same_outputs(reference, loaded):
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded["unet"](x["latents"], x["t"], x["context"]),
            reference["unet"](x["latents"], x["t"], x["context"]).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded["vae"].decode(x["latents"]),
                                   reference["vae"].decode(x["latents"]).sample,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded["vae"].encode(x["pixels"]).mean,
                                   reference["vae"].encode(x["pixels"]).latent_dist.mean,
                                   atol=1e-5, rtol=0)
        prompts = ["a red circle on the left", "Blue  SQUARE!"]
        ids = loaded["tokenizer"](prompts)
        expected_ids = reference["tokenizer"](prompts, padding="max_length", max_length=77,
                                              truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(loaded["text_encoder"](ids).last_hidden_state,
                                   reference["text_encoder"](ids).last_hidden_state,
                                   atol=1e-5, rtol=0)
    scheduler = loaded["scheduler"]
    assert isinstance(scheduler, DDIMScheduler)
    assert (scheduler.config.beta_schedule, scheduler.config.steps_offset,
            scheduler.config.set_alpha_to_one) == ("scaled_linear", 1, False)


def test_save_pretrained_writes_the_diffusers_layout(loaded, tmp_path):
    folder = checkpoints.save_pretrained(tmp_path / "copy", **loaded)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json",
                 "scheduler/scheduler_config.json"):
        assert (folder / name).is_file()
    assert_same_models(checkpoints.load_pretrained(folder), loaded)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert isinstance(ref.scheduler, diffusers.DDIMScheduler)


def test_single_file_export_matches_diffusers_own_conversion(reference, single_file):
    """diffusers' independent ldm → diffusers conversion turns minisd's export back into
    exactly the reference's tensors."""
    state = load_file(single_file)
    unet = convert_ldm_unet_checkpoint(state, dict(reference["unet"].config))
    vae = convert_ldm_vae_checkpoint(state, dict(reference["vae"].config))
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    for converted, model in ((unet, reference["unet"]), (vae, reference["vae"]),
                             (text, reference["text_encoder"])):
        expected = model.state_dict()
        assert converted.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(converted[key], tensor), key


def test_single_file_loads_to_identical_outputs(loaded, single_file, reference):
    parts = load_unchanged(single_file, config=reference["folder"])
    assert_same_models(parts, loaded)
    x = inputs(1)
    # identical weights; outputs within float rounding (the tensors' memory alignment differs
    # between the two files, and with it the CPU kernels' summation order)
    with torch.no_grad():
        torch.testing.assert_close(parts["unet"](x["latents"], x["t"], x["context"]),
                                   loaded["unet"](x["latents"], x["t"], x["context"]),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(parts["vae"].decode(x["latents"]),
                                   loaded["vae"].decode(x["latents"]), atol=1e-6, rtol=0)
    pipe = StableDiffusionPipeline.from_single_file(single_file, config=reference["folder"],
                                                    device="cpu")
    assert pipe.dtype == torch.float32 and isinstance(pipe.scheduler, DDIMScheduler)


def test_sd_v1_rules_agree_with_diffusers_at_full_size():
    """The rules for the real SD v1 configs, on meta tensors: 686 U-Net, 248 VAE and 196 text
    keys, which diffusers' conversion maps back to minisd's names and shapes."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNet2DConditionConfig())
        vae = AutoencoderKL(AutoencoderKLConfig.sd_v1())
        text = CLIPTextModel(CLIPTextConfig.sd_v1())
    state = checkpoints.single_file_state_dict(unet, vae, text)
    assert len(state) == 686 + 248 + 196
    for name in ("input_blocks.4.0.in_layers.0.weight", "output_blocks.2.1.conv.weight",
                 "output_blocks.5.2.conv.weight", "input_blocks.3.0.op.weight",
                 "middle_block.1.transformer_blocks.0.attn2.to_k.weight"):
        assert "model.diffusion_model." + name in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    for converted, model in ((convert_ldm_unet_checkpoint(state, unet.config.to_config()), unet),
                             (convert_ldm_vae_checkpoint(state, vae.config.to_config()), vae)):
        own = model.state_dict()
        assert converted.keys() == own.keys()
        assert all(converted[k].shape == own[k].shape for k in own)
    assert checkpoints.rename("input_blocks.4.0.in_layers.0.weight",
                              checkpoints.unet_rules(unet.config)) \
        == "down_blocks.1.resnets.0.norm1.weight"
    assert checkpoints.rename("decoder.up.3.block.2.nin_shortcut.weight",
                              checkpoints.vae_rules(vae.config)) \
        == "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"


def test_three_layouts_load_the_same(loaded, single_file, reference, tmp_path):
    """(a) under a state_dict wrapper in a .ckpt, with schedule buffers and a step
    counter; (b) flat; (c) text keys without `text_model.`: identical models."""
    flat = load_file(single_file)
    schedule = DDIMScheduler(**SD_SCHEDULE).schedule
    buffers = {"betas": schedule.betas, "alphas_cumprod": schedule.alphas_cumprod,
               "alphas_cumprod_prev": schedule.alphas_cumprod_prev,
               "posterior_variance": torch.rand(1000), "logvar": torch.zeros(1000)}
    torch.save({"state_dict": {**flat, **buffers}, "global_step": 470000, "epoch": 6},
               tmp_path / "a.ckpt")
    prefix = "cond_stage_model.transformer."
    short = {k.replace(prefix + "text_model.", prefix): v for k, v in flat.items()}
    save_file(short, tmp_path / "c.safetensors")
    for path in (tmp_path / "a.ckpt", single_file, tmp_path / "c.safetensors"):
        assert_same_models(load_unchanged(path, config=reference["folder"]), loaded)


def test_schedule_buffers_are_checked_never_an_error(loaded, single_file, reference,
                                                         tmp_path):
    flat = load_file(single_file)
    save_file({**flat, "alphas_cumprod": torch.linspace(0.99, 0.01, 1000)},
              tmp_path / "other.safetensors")
    with pytest.warns(UserWarning, match="noise schedule.*differs"):
        parts = load_unchanged(tmp_path / "other.safetensors", config=reference["folder"])
    assert_same_models(parts, loaded)


def test_unmatched_keys_are_listed(single_file, reference, tmp_path):
    flat = load_file(single_file)
    save_file({**flat, "model.diffusion_model.extra.weight": torch.zeros(1),
               "foo.bar": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="unexpected keys: foo.bar"):
        load_unchanged(tmp_path / "extra.safetensors", config=reference["folder"])
    save_file({**flat, "model.diffusion_model.extra.weight": torch.zeros(1)},
              tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="(?s)UNet2DConditionModel.*unexpected keys: "
                                         r"model\.diffusion_model\.extra\.weight"):
        load_unchanged(tmp_path / "extra.safetensors", config=reference["folder"])
    del flat["model.diffusion_model.out.2.weight"], flat["first_stage_model.decoder.up.3."
                                                        "block.0.norm1.bias"]
    save_file(flat, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: model\.diffusion_model\.out\.2\.weight"):
        load_unchanged(tmp_path / "missing.safetensors", config=reference["folder"])


def test_position_ids_are_ignored_other_keys_are_not(loaded, single_file, reference,
                                                         tmp_path):
    flat = load_file(single_file)
    ids = {"cond_stage_model.transformer.text_model.embeddings.position_ids":
           torch.arange(77)[None]}
    save_file({**flat, **ids}, tmp_path / "ids.safetensors")
    assert_same_models(load_unchanged(tmp_path / "ids.safetensors", config=reference["folder"]),
                       loaded)
    save_file({**flat, "cond_stage_model.transformer.text_model.embeddings.other":
               torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unexpected keys: cond_stage_model.transformer."
                                         "text_model.embeddings.other"):
        load_unchanged(tmp_path / "other.safetensors", config=reference["folder"])
    # the same in a diffusers folder: with and without the buffer
    folder = tmp_path / "model"
    shutil.copytree(reference["folder"], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    for extra in ({"text_model.embeddings.position_ids": torch.arange(77)[None]}, {}):
        save_file({**{k: v for k, v in state.items() if not k.endswith("position_ids")},
                   **extra}, weights)
        assert_same_models(checkpoints.load_pretrained(folder), loaded)
    save_file({**state, "text_model.embeddings.other": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys: text_model\.embeddings\.other"):
        checkpoints.load_pretrained(folder)


def test_broken_position_ids_of_merged_files_are_ignored(loaded, single_file, reference,
                                                         tmp_path):
    """Merged SD v1 files store the position_ids buffer as floats or wrong integers
    (AUTOMATIC1111/stable-diffusion-webui PR #6728): the positions stay 0…76, the text
    embeddings those of the clean file, and a warning says the buffer was broken."""
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    # (buffer, whether its values differ from 0…76: arange·0.99997 rounds back to whole
    # numbers in float16, so that one is only of the wrong dtype)
    broken = {"float32": (torch.arange(77, dtype=torch.float32)[None] - 1e-4, True),
              "float16": ((torch.arange(77) * 0.99997).half()[None], False),
              "shifted integers": (torch.arange(1, 78)[None], True)}
    # the trap: cast to integers, the float32 positions read 0, 0, 1, 2, …, 75
    assert broken["float32"][0].long()[0, :4].tolist() == [0, 0, 1, 2]
    ids = loaded["tokenizer"](["a red circle"])
    with torch.no_grad():
        expected = loaded["text_encoder"](ids).last_hidden_state
    for name, (position_ids, differs) in broken.items():
        save_file({**load_file(single_file), key: position_ids}, tmp_path / "merged.safetensors")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            parts = load_unchanged(tmp_path / "merged.safetensors", config=reference["folder"])
        messages = [str(w.message) for w in record]
        assert messages == ([(f"{tmp_path / 'merged.safetensors'}: the stored position_ids are "
                             f"not 0…76 ({position_ids.dtype}, starting "
                             f"{position_ids[0, :3].tolist()}), a known defect of merged "
                             "checkpoints; ignored: the positions are always 0…L−1")]
                            if differs else []), name
        assert_same_models(parts, loaded)
        with torch.no_grad():
            assert torch.equal(parts["text_encoder"](ids).last_hidden_state, expected), name


def test_an_inpainting_unet_is_refused_naming_the_key_and_both_shapes(single_file, reference,
                                                                       tmp_path):
    """9 input channels (latents, mask, masked-picture latents) never reach a convolution
    built for 4 (huggingface/diffusers #7003)."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state = load_file(single_file)
    assert state[key].shape == (8, 4, 3, 3)
    save_file({**state, key: torch.zeros(8, 9, 3, 3)}, tmp_path / "inpainting.safetensors")
    with pytest.raises(ValueError, match=rf"inpainting\.safetensors: {key} has shape "
                                         r"\(8, 9, 3, 3\), but the U-Net config takes 4 input "
                                         r"channels, shape \(8, 4, 3, 3\)\. This is an "
                                         r"inpainting model"):
        load_unchanged(tmp_path / "inpainting.safetensors", config=reference["folder"])


def test_ema_weights_are_selectable(loaded, single_file, reference, tmp_path):
    """model_ema.{U-Net key without dots}: taken by default when present, or on request."""
    flat = load_file(single_file)
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1
           for k, v in flat.items() if k.startswith("model.diffusion_model.")}
    both = {**flat, **ema, "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(1000)}
    save_file(both, tmp_path / "both.safetensors")
    folder = reference["folder"]
    trained = load_unchanged(tmp_path / "both.safetensors", config=folder, use_ema=False)
    assert_same_models(trained, loaded)
    for use_ema in (None, True):
        unet = load_unchanged(tmp_path / "both.safetensors", config=folder,
                              use_ema=use_ema)["unet"].state_dict()
        for key, tensor in loaded["unet"].state_dict().items():
            assert torch.equal(unet[key], tensor + 1), key
    # diffusers' own conversion reads the same EMA copy
    converted = convert_ldm_unet_checkpoint(both, dict(reference["unet"].config),
                                            extract_ema=True)
    assert all(torch.equal(converted[k], v + 1)
               for k, v in reference["unet"].state_dict().items())
    with pytest.raises(ValueError, match="use_ema=True but .* has no EMA weights"):
        load_unchanged(single_file, config=folder, use_ema=True)


class Custom:
    """Not a tensor, not a number: weights_only refuses to build it."""

    def __init__(self):
        self.value = 3


def leave_marker(path):
    """What a malicious pickle would do: run code while loading."""
    with open(path, "w") as f:
        f.write("code ran")


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return leave_marker, (str(self.marker),)


def test_pickles_with_objects_are_refused_and_run_no_code(loaded, single_file, reference,
                                                              tmp_path):
    flat = load_file(single_file)
    torch.save({"state_dict": flat, "callbacks": Custom()}, tmp_path / "custom.ckpt")
    with pytest.raises(ValueError, match=r"objects besides tensors.*Custom.*"
                                         r"trust_pickle=True.*--trust-pickle"):
        load_unchanged(tmp_path / "custom.ckpt", config=reference["folder"])
    parts = load_unchanged(tmp_path / "custom.ckpt", config=reference["folder"],
                           trust_pickle=True)
    assert_same_models(parts, loaded)

    marker = tmp_path / "marker.txt"
    torch.save({"state_dict": flat, "x": Malicious(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="leave_marker"):
        load_unchanged(tmp_path / "evil.ckpt", config=reference["folder"])
    assert not marker.exists()              # no code ran
    checkpoints.read_state_dict(tmp_path / "evil.ckpt", trust_pickle=True)
    assert marker.read_text() == "code ran"  # what trust_pickle=True would have allowed


def test_bin_weights_load_through_weights_only(loaded, reference, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(reference["folder"], folder)
    unet = folder / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"),
               unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    assert_same_models(checkpoints.load_pretrained(folder), loaded)
    torch.save({"x": Custom()}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="Custom.*trust_pickle=True"):
        checkpoints.load_pretrained(folder)


def test_truncated_files_are_clear_errors(single_file, reference, tmp_path):
    data = single_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file.*truncated"):
        load_unchanged(tmp_path / "cut.safetensors", config=reference["folder"])
    torch.save({"state_dict": load_file(single_file)}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint.*truncated"):
        load_unchanged(tmp_path / "cut.ckpt", config=reference["folder"])
    folder = tmp_path / "model"
    shutil.copytree(reference["folder"], folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not a "
                                         "readable safetensors file"):
        checkpoints.load_pretrained(folder)


def test_foreign_files_are_clear_errors(reference, tmp_path):
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":
                torch.zeros(768),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(ValueError, match="looks like an SDXL checkpoint"):
        load_unchanged(tmp_path / "sdxl.safetensors")
    unet_only = reference["folder"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="not an SD v1 single-file checkpoint.*conv_in.*"
                                         "from_pretrained"):
        load_unchanged(unet_only)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_unchanged(tmp_path / "notes.ckpt")
    shutil.copy(unet_only, tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="unknown weights format '.gguf'"):
        checkpoints.read_state_dict(tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        checkpoints.load_single_file(tmp_path / "absent.safetensors")


def test_bad_folders_are_clear_errors(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        checkpoints.load_pretrained(tmp_path)
    folder = tmp_path / "model"
    shutil.copytree(reference["folder"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline; minisd loads"):
        checkpoints.load_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet has no diffusion_pytorch_model\.safetensors"):
        checkpoints.load_pretrained(folder)


def test_unknown_scheduler_class_falls_back_with_a_warning():
    config = {"_class_name": "PNDMScheduler", **SD_SCHEDULE, "skip_prk_steps": True}
    with pytest.warns(UserWarning, match="no PNDMScheduler; using DPMSolverMultistepScheduler"):
        scheduler = checkpoints.load_scheduler(config)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_without_a_config_folder_sd_v1_is_assumed(loaded, single_file, reference, monkeypatch):
    """config=None: SD v1's built-in configs (here swapped for the tiny ones, as SD v1 itself
    is 4 GB), OpenAI's tokenizer and SD v1's noise schedule."""
    assert checkpoints._sd_v1_configs()["unet"] == UNet2DConditionConfig()
    tiny = checkpoints._configs_from_folder(reference["folder"])
    monkeypatch.setattr(checkpoints, "_sd_v1_configs", lambda: tiny)
    parts = load_unchanged(single_file)
    assert_same_models(parts, loaded)
    assert parts["tokenizer"]("a photo of a cat")[0, :7].tolist() == [
        49406, 320, 1125, 539, 320, 2368, 49407]                         # SD v1's ids of "a photo of a cat"
    scheduler = parts["scheduler"]
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.99915)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)
