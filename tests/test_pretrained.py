"""The one loader contract (minisd.pretrained): every model class, the tokenizer and the
schedulers load the same way, refuse the same mistakes with the same errors naming the file
and the key, and come back in eval mode. Config files as users have them: not JSON, a wrong
type or an impossible value are refused when loading, not later at decode time."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_config, tiny_pipeline, tiny_tokenizer

from minisd import checkpoints
from minisd.clip_contrastive import CLIPModel
from minisd.schedulers import DDIMScheduler
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig


def tiny_models() -> dict:
    pipe = tiny_pipeline()
    return {"vae": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder}


MODEL_CLASSES = {"vae": AutoencoderKL, "unet": UNet2DConditionModel,
                 "text_encoder": CLIPTextModel}
WEIGHTS = {"vae": "diffusion_pytorch_model.safetensors",
           "unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A diffusers model folder of the tiny pipeline, weights stored in float16."""
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("contract") / "model"
    pipe.to(dtype=torch.float16).save_pretrained(folder)
    return folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("part", MODEL_CLASSES)
def test_every_model_loads_from_its_folder_a_subfolder_or_the_model_folder(part, model_folder):
    cls = MODEL_CLASSES[part]
    by_folder = cls.from_pretrained(model_folder / part)
    by_subfolder = cls.from_pretrained(model_folder, subfolder=part)
    by_model_folder = cls.from_pretrained(model_folder)
    assert same_weights(by_folder, by_subfolder) and same_weights(by_folder, by_model_folder)
    for model in (by_folder, by_subfolder, by_model_folder):
        assert not model.training                                # eval mode after loading
        assert {p.dtype for p in model.parameters()} == {torch.float32}   # float16 on disk
    half = cls.from_pretrained(model_folder, part, torch_dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with pytest.raises(TypeError, match="torch_dtype must be a floating torch.dtype"):
        cls.from_pretrained(model_folder, part, torch_dtype="float16")


@pytest.mark.parametrize("part", MODEL_CLASSES)
def test_every_model_builds_from_a_config_dict_or_dataclass(part, model_folder):
    cls = MODEL_CLASSES[part]
    config = json.loads((model_folder / part / "config.json").read_text())
    from_dict, from_dataclass = cls.from_config(config), cls.from_config(cls.load_config(
        model_folder, part))
    assert from_dict.config == from_dataclass.config == cls.from_pretrained(model_folder,
                                                                             part).config
    assert from_dict.training                       # a new model, to be trained
    assert from_dict.state_dict().keys() == tiny_models()[part].state_dict().keys()


def test_the_clip_model_keeps_the_contract(tmp_path):
    model = CLIPModel(tiny_config())
    model.save_pretrained(tmp_path / "models" / "clip")
    loaded = CLIPModel.from_pretrained(tmp_path / "models", subfolder="clip")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    assert CLIPModel.from_config(model.config.to_config()).config == loaded.config
    with pytest.raises(FileNotFoundError, match="models/absent does not exist"):
        CLIPModel.from_pretrained(tmp_path / "models", subfolder="absent")


def test_the_tokenizer_and_the_schedulers_load_from_a_folder_or_a_model_folder(model_folder):
    ids = tiny_tokenizer()("a red circle")
    for tokenizer in (CLIPTokenizer.from_pretrained(model_folder / "tokenizer"),
                      CLIPTokenizer.from_pretrained(model_folder, subfolder="tokenizer"),
                      CLIPTokenizer.from_pretrained(model_folder)):
        assert torch.equal(tokenizer("a red circle"), ids)
    for scheduler in (checkpoints.scheduler_from_pretrained(model_folder / "scheduler"),
                      checkpoints.scheduler_from_pretrained(model_folder, subfolder="scheduler"),
                      checkpoints.scheduler_from_pretrained(model_folder)):
        assert scheduler.config == tiny_pipeline().scheduler.config


# ---- the same mistakes, the same errors ----

LOADERS = {**{part: cls.from_pretrained for part, cls in MODEL_CLASSES.items()},
           "tokenizer": CLIPTokenizer.from_pretrained, "scheduler": checkpoints.scheduler_from_pretrained}
CONFIGS = {"vae": "config.json", "unet": "config.json", "text_encoder": "config.json",
           "tokenizer": "vocab.json", "scheduler": "scheduler_config.json"}


@pytest.mark.parametrize("part", LOADERS)
def test_a_missing_folder_or_file_is_a_file_not_found_error_naming_it(part, model_folder,
                                                                     tmp_path):
    load = LOADERS[part]
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/absent does not exist"):
        load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/{part} does not exist"):
        load(tmp_path, subfolder=part)
    (tmp_path / part).mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/{part} has no {CONFIGS[part]}"):
        load(tmp_path / part)
    if part in WEIGHTS:
        (tmp_path / part / "config.json").write_bytes(
            (model_folder / part / "config.json").read_bytes())
        with pytest.raises(FileNotFoundError, match=f"{tmp_path}/{part} has no {WEIGHTS[part]}"):
            load(tmp_path / part)


@pytest.mark.parametrize("part", LOADERS)
def test_a_config_that_is_not_json_names_the_file_and_the_place(part, model_folder, tmp_path):
    folder = shutil.copytree(model_folder / part, tmp_path / part)
    path = folder / CONFIGS[part]
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON: Expecting value at line 2, "
                                         r"column 7"):
        LOADERS[part](folder)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=rf"{path} is not a JSON text file: byte 0 is not UTF-8"):
        LOADERS[part](folder)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path} holds a JSON list, not an object"):
        LOADERS[part](folder)


# Values a user's config.json really holds, each refused at load time naming file and key.
BAD_VALUES = [
    ("vae", "scaling_factor", "0.18215", "scaling_factor must be float, got '0.18215' \\(str\\)"),
    ("vae", "scaling_factor", 0, "scaling_factor must be > 0 \\(and finite\\), got 0"),
    ("vae", "scaling_factor", None, "scaling_factor must be float, got None"),
    ("vae", "latent_channels", -4, "latent_channels must be > 0 \\(and finite\\), got -4"),
    ("vae", "block_out_channels", [8, -8, 16, 16],
     "block_out_channels must be > 0 \\(and finite\\), got \\(8, -8, 16, 16\\)"),
    ("vae", "layers_per_block", 1.5, "layers_per_block must be int, got 1.5"),
    ("vae", "force_upcast", "yes", "force_upcast must be bool, got 'yes'"),
    ("vae", "down_block_types", ["DownBlock2D"] * 4, "unsupported down_block_types"),
    ("unet", "in_channels", -4, "in_channels must be > 0 \\(and finite\\), got -4"),
    ("unet", "block_out_channels", [8, 16, 16, 0], "block_out_channels must be > 0"),
    ("unet", "cross_attention_dim", [16, 16], "cross_attention_dim must be int, got \\[16, 16\\]"),
    ("unet", "attention_head_dim", 32, ("attention_head_dim 32 \\(the number of heads\\) exceeds "
                                       "the 8 channels of its level")),
    ("unet", "norm_eps", 0.0, "norm_eps must be > 0"),
    ("unet", "class_embed_type", "timestep", "class_embed_type='timestep' is not supported"),
    ("text_encoder", "hidden_size", 0, "hidden_size must be > 0"),
    ("text_encoder", "num_attention_heads", 3, ("hidden_size 16 is not divisible by "
                                               "num_attention_heads 3")),
    ("text_encoder", "hidden_act", "relu", "hidden_act 'relu' is not supported"),
    ("text_encoder", "eos_token_id", 600, ("eos_token_id 600 is not an id of the 521-token "
                                          "vocabulary")),
    ("text_encoder", "vocab_size", "521", "vocab_size must be int, got '521'"),
]


@pytest.mark.parametrize(("part", "key", "value", "message"), BAD_VALUES)
def test_a_wrong_type_or_impossible_value_is_refused_at_load_naming_file_and_key(
        part, key, value, message, model_folder, tmp_path):
    folder = shutil.copytree(model_folder / part, tmp_path / part)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=rf"^{folder}/config.json: .*{message}"):
        MODEL_CLASSES[part].from_pretrained(folder)


def test_the_constructors_refuse_the_same_values():
    with pytest.raises(TypeError, match="scaling_factor must be float, got '0.18215'"):
        AutoencoderKLConfig(scaling_factor="0.18215")
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        AutoencoderKLConfig(scaling_factor=float("nan"))
    with pytest.raises(ValueError, match="sample_size must be > 0"):
        UNet2DConditionConfig(sample_size=0)
    with pytest.raises(TypeError, match="max_position_embeddings must be int"):
        CLIPTextConfig(max_position_embeddings=True)
    # JSON's whole numbers are floats where a float is asked for; lists become tuples
    config = AutoencoderKLConfig(scaling_factor=1, block_out_channels=[32, 64],
                                 down_block_types=["DownEncoderBlock2D"] * 2,
                                 up_block_types=["UpDecoderBlock2D"] * 2)
    assert config.scaling_factor == 1 and config.block_out_channels == (32, 64)


def test_a_config_of_another_class_names_the_file_and_the_key(model_folder, tmp_path):
    with pytest.raises(ValueError, match=r"unet/config.json: _class_name says this config "
                                         r"describes a UNet2DConditionModel; it is not a "
                                         r"config of AutoencoderKL"):
        AutoencoderKL.from_pretrained(model_folder / "unet")
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"]}))
    with pytest.raises(ValueError, match="architectures says this config describes a CLIPModel"):
        CLIPTextModel.from_pretrained(folder)


def test_a_misspelt_key_is_named_with_the_field_it_resembles(model_folder, tmp_path):
    folder = shutil.copytree(model_folder / "vae", tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    del config["scaling_factor"]
    (folder / "config.json").write_text(json.dumps({**config, "scaling_facter": 0.13025}))
    with pytest.warns(UserWarning, match=rf"{folder}/config.json: unknown key 'scaling_facter' "
                                         r"is ignored; did you mean 'scaling_factor'\?"):
        AutoencoderKL.from_pretrained(folder)


def test_configs_written_by_diffusers_and_transformers_load_without_warnings(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    models = tiny_models()
    diffusers.AutoencoderKL(**{k: v for k, v in models["vae"].config.to_config().items()
                               if not k.startswith("_")}).save_pretrained(tmp_path / "vae")
    diffusers.UNet2DConditionModel(**{k: v for k, v in models["unet"].config.to_config().items()
                                      if not k.startswith("_")}).save_pretrained(tmp_path / "unet")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **models["text_encoder"].config.to_config())).save_pretrained(tmp_path / "text_encoder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for part, cls in MODEL_CLASSES.items():
            assert cls.from_pretrained(tmp_path, part).config == models[part].config


def test_a_scheduler_config_the_scheduler_refuses_names_the_file(tmp_path):
    DDIMScheduler().save_pretrained(tmp_path / "scheduler")
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "thresholding": True}))
    with pytest.raises(ValueError, match=rf"^{path}: .*thresholding"):
        checkpoints.scheduler_from_pretrained(tmp_path / "scheduler")


def test_a_tokenizer_config_of_the_wrong_kind_names_the_file_and_the_key(model_folder,
                                                                        tmp_path):
    folder = shutil.copytree(model_folder / "tokenizer", tmp_path / "tokenizer")
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, "model_max_length": "77"}))
    with pytest.raises(ValueError, match=rf"{path}: model_max_length must be an integer >= 2, "
                                         r"got '77'"):
        CLIPTokenizer.from_pretrained(folder)
    path.write_text(json.dumps({**settings, "pad_token": 0}))
    with pytest.raises(ValueError, match=rf"{path}: pad_token must be a token string, got 0"):
        CLIPTokenizer.from_pretrained(folder)


def test_loading_skips_the_initialisation_it_would_overwrite():
    """A model is built on `meta` with the initialisers skipped, then adopts the file's
    weights: in a fresh process, loading the bundled pipeline never imports torch._dynamo (which
    meta's Python initialisers pull in, seconds on a small machine), and the weights are the
    file's."""
    code = ("import sys; from minisd import StableDiffusionPipeline, package_data; "
            "from safetensors.torch import load_file; "
            "pipe = StableDiffusionPipeline.from_pretrained(); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'; "
            "stored = load_file(package_data.bundled_model() / 'unet' / "
            "'diffusion_pytorch_model.safetensors'); "
            "assert all((pipe.unet.state_dict()[k] == v.float()).all() for k, v in stored.items())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
