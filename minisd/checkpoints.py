"""Loading and saving weights: diffusers model folders and original SD v1 single files.

Stable Diffusion weights come in two layouts.

1. A **diffusers model folder**, the layout minisd uses for its own models:

       model_index.json         which class each part is
       unet/          config.json + diffusion_pytorch_model.safetensors
       vae/           config.json + diffusion_pytorch_model.safetensors
       text_encoder/  config.json + model.safetensors
       tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
       scheduler/     scheduler_config.json

   minisd's parameter names are diffusers' and transformers', so these load with no
   renaming (older folders hold `.bin` files instead, read with `weights_only=True`): each
   part through its class's `from_pretrained(folder, subfolder=part)` (minisd/pretrained.py).

2. An **original single file** (`.ckpt` or `.safetensors`), as CompVis and RunwayML released
   SD v1.x: one state dict of the whole `LatentDiffusion` model, U-Net under
   `model.diffusion_model.`, VAE under `first_stage_model.`, text encoder under
   `cond_stage_model.transformer.` (with or without `text_model.`), often inside a
   `state_dict` wrapper, sometimes with an EMA copy of the U-Net (`model_ema.`) and the
   noise schedule's buffers (`betas`, `alphas_cumprod`, …). The names are those of the
   `ldm` code (github.com/CompVis/stable-diffusion), mapped to diffusers' by three kinds of
   rule, built from the model's config (`unet_rules`, `vae_rules`):

   - block prefixes by index arithmetic: level i of the U-Net's down path holds
     `layers_per_block` ResNet(+attention) blocks then a downsampler, numbered one after the
     other as `input_blocks.{k}`; the VAE decoder counts its levels the other way round;
   - leaf renames inside a block (`in_layers.0` → `norm1`, `nin_shortcut` → `conv_shortcut`);
   - one shape rule: the VAE's attention projections are 1×1 convolutions in `ldm`,
     (C, C, 1, 1), and linear layers in diffusers, (C, C).

   The same rules run backwards in `save_single_file`.

Loading is strict: every parameter must be in the file and every tensor of the file must be
used (a text encoder's `position_ids` buffer and the schedule buffers aside); otherwise a
ValueError lists the missing and unexpected keys by the file's names. Pickled files (`.ckpt`,
`.bin`) are read with `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers but runs no code from the file (`minisd.state_dict.read_state_dict`).
"""

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from minisd.pretrained import check_dtype, find_folder, naming, read_json
from minisd.schedulers import SCHEDULERS, SD_V1_SCHEDULER_CONFIG, Scheduler
from minisd.state_dict import listed, read_state_dict
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel, text_encoder_state
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig

MODEL_INDEX = "model_index.json"
MODEL_FOLDER = (f"a diffusers model folder has {MODEL_INDEX} and unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/ folders with their configs")
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# the three networks of a model folder, by part (the folder's subfolder names)
MODELS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
# weight files of each network, preferred first (diffusers' and transformers' names)
WEIGHT_FILES = {part: cls.weights_names for part, cls in MODELS.items()}
# what save_pretrained writes into model_index.json for each part (library, class)
LIBRARIES = {"unet": ("diffusers", "UNet2DConditionModel"),
             "vae": ("diffusers", "AutoencoderKL"),
             "text_encoder": ("transformers", "CLIPTextModel"),
             "tokenizer": ("transformers", "CLIPTokenizer")}
SCHEDULER_CLASSES = {cls.__name__: cls for cls in SCHEDULERS.values()}
SCHEDULER_CONFIG = "scheduler_config.json"
# used when a folder names a scheduler minisd does not have (SD v1.5 ships PNDMScheduler)
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"

# The SD v1 single-file prefixes (ldm's LatentDiffusion attribute names).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."
TEXT_MODEL = "text_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
# ldm's noise-schedule buffers and EMA bookkeeping: not weights, never a load error
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates"}
# prefixes of checkpoints that are not SD v1, with what they are
FOREIGN = {"conditioner.embedders.": "an SDXL checkpoint",
           "cond_stage_model.model.": "an SD 2.x checkpoint (OpenCLIP text encoder)",
           "double_blocks.": "a FLUX checkpoint", "joint_blocks.": "an SD3 checkpoint"}


# ---------------------------------------------------------------- diffusers folders

def load_scheduler(config: dict, source: str | Path | None = None) -> Scheduler:
    """A scheduler from a `scheduler_config.json` dict, by its `_class_name`.

    A scheduler minisd does not implement (SD v1.5's PNDMScheduler, LMSDiscreteScheduler, …)
    becomes DPMSolverMultistepScheduler on the same noise schedule, with a warning;
    choose another per call with the pipeline's `scheduler=` argument.
    Raises ValueError naming `source` (the file) for a config the scheduler refuses.
    """
    name = config.get("_class_name", DEFAULT_SCHEDULER)
    if name not in SCHEDULER_CLASSES:
        warnings.warn(f"minisd has no {name}; using {DEFAULT_SCHEDULER} on the same noise "
                      f"schedule (pick another with scheduler=, one of {', '.join(SCHEDULERS)})",
                      stacklevel=3)
        name = DEFAULT_SCHEDULER
    with naming(source):
        return SCHEDULER_CLASSES[name].from_config(config)


def scheduler_from_pretrained(path: str | Path, subfolder: str | None = None) -> Scheduler:
    """The scheduler of a `scheduler/` folder (`path`, `path/subfolder`, or the `scheduler/`
    of a model folder), of the class its `scheduler_config.json` names (`load_scheduler`).
    Raises FileNotFoundError naming a missing folder or file; ValueError naming the file for
    a config that is not JSON or that the scheduler refuses."""
    folder = find_folder(path, subfolder, "scheduler", (SCHEDULER_CONFIG,))
    config_path = folder / SCHEDULER_CONFIG
    return load_scheduler(read_json(config_path), config_path)


def load_pretrained(folder: str | Path, torch_dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", trust_pickle: bool = False) -> dict:
    """Load a diffusers-format Stable Diffusion folder (the layout in the module docstring):
    each part through its class's `from_pretrained(folder, subfolder=part)`.

    Args:
        folder: the model folder (with model_index.json).
        torch_dtype, device: where the three networks go (the file's dtype does not matter).
        trust_pickle: passed to `read_state_dict` for `.bin` files.
    Returns:
        {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}: minisd objects, the
        networks in eval mode.
    Raises:
        FileNotFoundError naming a missing folder or file; ValueError naming the file for a
        pipeline class minisd does not load (SDXL, …), configs minisd cannot build (and the
        key), damaged weights, or weights that do not match their config (listing the keys).
    """
    folder = find_folder(folder, None, None, (MODEL_INDEX,))
    index = read_json(folder / MODEL_INDEX, MODEL_FOLDER)
    kind = index.get("_class_name")
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"{folder / MODEL_INDEX} describes a {kind}; minisd loads "
                         f"{' and '.join(PIPELINE_CLASSES)} folders (SD v1.x, v2.x)")
    parts = {part: cls.from_pretrained(folder, part, torch_dtype,
                                       trust_pickle=trust_pickle).to(device)
             for part, cls in MODELS.items()}
    return {**parts, "tokenizer": CLIPTokenizer.from_pretrained(folder, "tokenizer"),
            "scheduler": scheduler_from_pretrained(folder, "scheduler")}


def save_pretrained(folder: str | Path, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                    tokenizer: CLIPTokenizer, unet: UNet2DConditionModel,
                    scheduler: Scheduler) -> Path:
    """Write a diffusers-format model folder (safetensors, in the models' dtypes) that
    `load_pretrained` and diffusers' `StableDiffusionPipeline.from_pretrained` both read.
    Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline",
             **{part: list(library) for part, library in LIBRARIES.items()},
             "scheduler": ["diffusers", type(scheduler).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------- single-file key rules

# leaf renames inside one block: ldm name → diffusers name
UNET_RESNET_LEAVES = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.",
                      "emb_layers.1.": "time_emb_proj.", "out_layers.0.": "norm2.",
                      "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
VAE_RESNET_LEAVES = {"nin_shortcut.": "conv_shortcut."}
VAE_ATTENTION_LEAVES = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.",
                        "proj_out.": "to_out.0."}
# the shape rule: these VAE weights are 1×1 convs in ldm, (C, C, 1, 1), linear in diffusers
VAE_CONV_AS_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")

Rule = tuple[str, str, dict]   # (ldm prefix, diffusers prefix, leaf renames)


def unet_rules(config: UNet2DConditionConfig) -> list[Rule]:
    """ldm → diffusers block prefixes of the U-Net, by walking the config's levels.

    ldm numbers the down path's blocks in one sequence, `input_blocks.{k}` (k = 0 is
    conv_in), and the up path's as `output_blocks.{k}`; at level i (L = layers_per_block):

        input_blocks.{k}.0 / .1   → down_blocks.{i}.resnets.{j} / .attentions.{j}, j < L
        input_blocks.{k}.0.op     → down_blocks.{i}.downsamplers.0.conv  (k after them)
        output_blocks.{k}.0 / .1  → up_blocks.{i}.resnets.{j} / .attentions.{j}, j ≤ L
        output_blocks.{k}.2.conv  → up_blocks.{i}.upsamplers.0.conv (.1.conv without attention)

    so for SD v1 (L = 2), input_blocks.4 is down_blocks.1.resnets.0 ((4 − 1) = 3·1 + 0).
    """
    rules = [("time_embed.0.", "time_embedding.linear_1.", {}),
             ("time_embed.2.", "time_embedding.linear_2.", {}),
             ("input_blocks.0.0.", "conv_in.", {}),
             ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET_LEAVES),
             ("middle_block.1.", "mid_block.attentions.0.", {}),
             ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET_LEAVES),
             ("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {})]
    layers = config.per_level("layers_per_block")
    levels = len(layers)
    k = 1
    for i, block_type in enumerate(config.down_block_types):
        for j in range(layers[i]):
            rules.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.",
                          UNET_RESNET_LEAVES))
            if block_type == "CrossAttnDownBlock2D":
                rules.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", {}))
            k += 1
        if i < levels - 1:
            rules.append((f"input_blocks.{k}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.",
                          {}))
            k += 1
    k = 0
    for i, block_type in enumerate(config.up_block_types):
        level = levels - 1 - i
        attention = block_type == "CrossAttnUpBlock2D"
        for j in range(layers[level] + 1):
            rules.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.",
                          UNET_RESNET_LEAVES))
            if attention:
                rules.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", {}))
            if level > 0 and j == layers[level]:
                rules.append((f"output_blocks.{k}.{2 if attention else 1}.conv.",
                              f"up_blocks.{i}.upsamplers.0.conv.", {}))
            k += 1
    return rules


def vae_rules(config: AutoencoderKLConfig) -> list[Rule]:
    """ldm → diffusers block prefixes of the VAE. The encoder's levels have the same order
    in both (`encoder.down.{i}` → `encoder.down_blocks.{i}`); the decoder's are numbered from
    the highest resolution in ldm and from the lowest in diffusers, so with n levels
    `decoder.up.{n−1−i}` → `decoder.up_blocks.{i}`. Keys matching no rule (conv_in,
    conv_out, quant_conv, post_quant_conv) keep their names."""
    n, L = len(config.block_out_channels), config.layers_per_block
    rules = [("encoder.norm_out.", "encoder.conv_norm_out.", {}),
             ("decoder.norm_out.", "decoder.conv_norm_out.", {})]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET_LEAVES),
                  (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.",
                   VAE_ATTENTION_LEAVES),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET_LEAVES)]
    for i in range(n):
        up = n - 1 - i
        rules += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                   VAE_RESNET_LEAVES) for j in range(L)]
        rules += [(f"decoder.up.{up}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                   VAE_RESNET_LEAVES) for j in range(L + 1)]
        if i < n - 1:
            rules.append((f"encoder.down.{i}.downsample.",
                          f"encoder.down_blocks.{i}.downsamplers.0.", {}))
        if up > 0:
            rules.append((f"decoder.up.{up}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.",
                          {}))
    return rules


def rename(key: str, rules: list[Rule], to_diffusers: bool = True) -> str:
    """Rename one key by the first rule whose prefix it starts with (the rules' prefixes
    are disjoint), then the leaf renames of that block; keys matching no rule are kept.
    `to_diffusers=False` applies the rules backwards (diffusers → ldm)."""
    for ldm, diffusers, leaves in rules:
        old, new = (ldm, diffusers) if to_diffusers else (diffusers, ldm)
        if key.startswith(old):
            rest = key[len(old):]
            for leaf_ldm, leaf_diffusers in leaves.items():
                leaf_old, leaf_new = ((leaf_ldm, leaf_diffusers) if to_diffusers
                                      else (leaf_diffusers, leaf_ldm))
                if rest.startswith(leaf_old):
                    rest = leaf_new + rest[len(leaf_old):]
                    break
            return new + rest
    return key


def _vae_linear(key: str, tensor: torch.Tensor, to_diffusers: bool) -> torch.Tensor:
    """The shape rule: (C, C, 1, 1) ↔ (C, C) for the VAE's attention projections."""
    if ".mid_block.attentions." in key and key.endswith(VAE_CONV_AS_LINEAR):
        return tensor.reshape(tensor.shape[:2]) if to_diffusers else tensor[:, :, None, None]
    return tensor


# ---------------------------------------------------------------- single files
#
# load_single_file runs five steps, one job each: read the file (`read_single_file`), pick
# the U-Net's EMA or trained weights (`select_ema`), build the configs
# (`single_file_components`), map the keys to the diffusers names of each part
# (`split_parts`), and load each part strictly (`PretrainedModel.from_state_dict`, errors
# naming keys as the file does, `file_names`).

def load_single_file(path: str | Path, config: str | Path | None = None,
                     use_ema: bool | None = None, torch_dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", trust_pickle: bool = False) -> dict:
    """Load an original SD v1 single-file checkpoint (`.safetensors` or `.ckpt`).

    The layouts accepted: keys flat at the top level or under `state_dict`;
    text-encoder keys under `cond_stage_model.transformer.text_model.` or, from older
    transformers, `cond_stage_model.transformer.` directly; with or without a
    `position_ids` buffer (ignored even when broken, as merged files store it); schedule
    buffers (`betas`, `alphas_cumprod`, …) compared with the scheduler's and otherwise
    ignored (a mismatch warns).

    Args:
        path: the file; it is only read.
        config: None for SD v1.x's built-in configs (U-Net, VAE, ViT-L/14 text tower, OpenAI's
            tokenizer, the SD v1 noise schedule), or a diffusers model folder whose configs,
            tokenizer and scheduler describe the file's model (weights there are not read).
        use_ema: which U-Net weights when the file also holds the EMA copy (`model_ema.`, its
            keys the U-Net's keys with the dots removed, as ldm's LitEma names them): None
            takes the EMA copy when present (the one SD's authors sample with), True requires
            it, False takes the trained weights.
        torch_dtype, device: where the networks go.
        trust_pickle: the opt-in of `read_state_dict` for pickles holding other objects.
    Returns:
        {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}, as `load_pretrained`.
    Raises:
        ValueError for a foreign checkpoint (SDXL, SD 2.x, …), a U-Net whose input channels
        differ from the config's (an inpainting model: 9), use_ema=True without EMA
        weights, or keys that do not match (missing and unexpected ones listed by the file's
        names); the errors of `read_state_dict`.
    """
    source = str(path)
    torch_dtype = check_dtype(torch_dtype)
    state = select_ema(read_single_file(path, trust_pickle), use_ema, source)
    configs, tokenizer, scheduler = single_file_components(config, state, source)
    parts = split_parts(state, configs, source)
    _check_schedule(state, scheduler, source)
    names = file_names(configs)
    models = {part: cls.from_state_dict(configs[part], parts[part], source, names[part],
                                        torch_dtype).to(device)
              for part, cls in MODELS.items()}
    return {**models, "tokenizer": tokenizer, "scheduler": scheduler}


def file_names(configs: dict) -> dict:
    """Per part, a model key → its name in an SD v1 single file (the rules run backwards),
    so that load errors name keys as the file does."""
    unet, vae = unet_rules(configs["unet"]), vae_rules(configs["vae"])
    return {"unet": lambda k: UNET_PREFIX + rename(k, unet, to_diffusers=False),
            "vae": lambda k: VAE_PREFIX + rename(k, vae, to_diffusers=False),
            "text_encoder": lambda k: TEXT_PREFIX + TEXT_MODEL + k}


def read_single_file(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Step 1, read: the file's tensors (a `state_dict` wrapper opened, numbers such as
    `global_step` dropped), refused unless they are an SD v1 checkpoint."""
    state = read_state_dict(path, trust_pickle)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (keys: {sorted(state)[:8]})")
    _check_sd_v1(tensors, str(path))
    return tensors


def _check_sd_v1(state: dict, source: str) -> None:
    """Refuse a checkpoint that is not SD v1 before listing hundreds of keys."""
    if any(k.startswith(UNET_PREFIX) for k in state):
        for prefix, what in FOREIGN.items():
            if any(k.startswith(prefix) for k in state):
                raise ValueError(f"{source} looks like {what} (keys under {prefix!r}); minisd "
                                 "loads SD v1.x single files")
        return
    tops = sorted({k.split(".")[0] for k in state})
    what = next((w for p, w in FOREIGN.items() if any(k.startswith(p) for k in state)), None)
    raise ValueError(f"{source} is not an SD v1 single-file checkpoint: no keys under "
                     f"{UNET_PREFIX!r}" + (f"; it looks like {what}" if what else "")
                     + f" (top-level names: {', '.join(tops[:10])}). A diffusers model "
                     "folder loads with from_pretrained instead")


def select_ema(state: dict, use_ema: bool | None, source: str) -> dict:
    """Step 2, EMA: with the EMA copy chosen (see `load_single_file`), the U-Net's weights
    replaced by their `model_ema.` copies; the EMA keys themselves are left for `split_parts`
    to skip. Raises ValueError for use_ema=True without EMA weights, or an EMA copy that
    lacks some U-Net weights (listed)."""
    has_ema = any(k.startswith(EMA_PREFIX) and k not in SCHEDULE_BUFFERS for k in state)
    if use_ema and not has_ema:
        raise ValueError(f"use_ema=True but {source} has no EMA weights ({EMA_PREFIX}…); "
                         "load it with use_ema=None or False")
    if not (has_ema if use_ema is None else use_ema):
        return state
    ema = {k: EMA_PREFIX + k.removeprefix("model.").replace(".", "")
           for k in state if k.startswith(UNET_PREFIX)}
    missing = sorted(copy for copy in ema.values() if copy not in state)
    if missing:
        raise ValueError(f"{source} has an incomplete EMA copy of the U-Net:"
                         + listed("missing EMA keys", missing)
                         + "\nLoad the trained weights with use_ema=False")
    return {**state, **{k: state[copy] for k, copy in ema.items()}}


def _sd_v1_configs() -> dict:
    return {"unet": UNet2DConditionConfig(), "vae": AutoencoderKLConfig.sd_v1(),
            "text_encoder": CLIPTextConfig.sd_v1()}


def _configs_from_folder(folder: Path) -> dict:
    return {part: cls.load_config(folder, part) for part, cls in MODELS.items()}


def single_file_components(config: str | Path | None, state: dict, source: str
                           ) -> tuple[dict, CLIPTokenizer, Scheduler]:
    """Step 3, configs: the three networks' configs, the tokenizer and the scheduler, SD v1's
    built-in ones or those of the model folder `config`. Raises ValueError when the file's
    U-Net reads another number of input channels than the config's (an inpainting U-Net
    has 9: latents, mask, masked-picture latents), naming the key and both shapes."""
    if config is None:
        configs, tokenizer = _sd_v1_configs(), CLIPTokenizer.openai()
        scheduler = load_scheduler({**SD_V1_SCHEDULER_CONFIG, "_class_name": DEFAULT_SCHEDULER})
    else:
        configs = _configs_from_folder(Path(config))
        tokenizer = CLIPTokenizer.from_pretrained(config, "tokenizer")
        scheduler = scheduler_from_pretrained(config, "scheduler")
    _check_in_channels(state, configs["unet"], source)
    return configs, tokenizer, scheduler


def _check_in_channels(state: dict, unet: UNet2DConditionConfig, source: str) -> None:
    found = tuple(state[CONV_IN].shape) if CONV_IN in state else ()
    if len(found) != 4 or found[1] == unet.in_channels:
        return
    expected = (unet.block_out_channels[0], unet.in_channels, 3, 3)
    what = (" This is an inpainting model (4 latent + 1 mask + 4 masked-picture channels); "
            "minisd's pipeline draws from text and pictures, not inpainting."
            if found[1] == 9 else "")
    raise ValueError(f"{source}: {CONV_IN} has shape {found}, but the U-Net config takes "
                     f"{unet.in_channels} input channels, shape {expected}.{what}")


def split_parts(state: dict, configs: dict, source: str) -> dict[str, dict]:
    """Step 4, map keys: the file's tensors split into the three networks' state dicts under
    diffusers' names (`unet_rules`, `vae_rules` and the VAE's shape rule; the text encoder's
    `text_encoder_state`). EMA keys and schedule buffers are skipped. Raises ValueError
    listing the keys that belong to no part."""
    rules = {"unet": unet_rules(configs["unet"]), "vae": vae_rules(configs["vae"])}
    parts = {"unet": {}, "vae": {}, "text_encoder": {}}
    unexpected = []
    for key, tensor in state.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][rename(key[len(UNET_PREFIX):], rules["unet"])] = tensor
        elif key.startswith(VAE_PREFIX):
            name = rename(key[len(VAE_PREFIX):], rules["vae"])
            parts["vae"][name] = _vae_linear(name, tensor, to_diffusers=True)
        elif key.startswith(TEXT_PREFIX):
            parts["text_encoder"][key[len(TEXT_PREFIX):]] = tensor
        elif not (key.startswith(EMA_PREFIX) or key in SCHEDULE_BUFFERS):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{source} has keys that belong to no part of SD v1:"
                         + listed("unexpected keys", sorted(unexpected)))
    parts["text_encoder"] = text_encoder_state(parts["text_encoder"], source)
    return parts


def _check_schedule(state: dict, scheduler: Scheduler, source: str) -> None:
    """Compare the file's ᾱ (or β) with the scheduler's; warn when they differ."""
    for key, ours in (("alphas_cumprod", scheduler.alphas_cumprod),
                      ("betas", scheduler.schedule.betas)):
        if key in state:
            theirs = state[key].double().cpu()
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours.double(),
                                                                rtol=1e-4, atol=1e-6):
                warnings.warn(f"{source} stores a noise schedule ({key}) that differs from "
                              "the scheduler config's; sampling uses the config's",
                              stacklevel=3)
            return


def single_file_state_dict(unet: UNet2DConditionModel, vae: AutoencoderKL,
                           text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The three networks' weights in the original SD v1 single-file layout, by the rules of
    `unet_rules` and `vae_rules` run backwards: keys under `model.diffusion_model.`,
    `first_stage_model.` (attention projections as 1×1 convs, (C, C, 1, 1)) and
    `cond_stage_model.transformer.text_model.`. The tensors are the models' own (no copy)."""
    state = {}
    unet_map, vae_map = unet_rules(unet.config), vae_rules(vae.config)
    for key, tensor in unet.state_dict().items():
        state[UNET_PREFIX + rename(key, unet_map, to_diffusers=False)] = tensor
    for key, tensor in vae.state_dict().items():
        state[VAE_PREFIX + rename(key, vae_map, to_diffusers=False)] = \
            _vae_linear(key, tensor, to_diffusers=False)
    for key, tensor in text_encoder.state_dict().items():
        state[TEXT_PREFIX + TEXT_MODEL + key] = tensor
    return state


def save_single_file(path: str | Path, unet: UNet2DConditionModel, vae: AutoencoderKL,
                     text_encoder: CLIPTextModel) -> Path:
    """Export the three networks to an original SD v1 single file
    (`single_file_state_dict`): a `.safetensors` path gets a flat safetensors file, a `.ckpt`
    path a `torch.save`d {"state_dict": …}, as ldm wrote them. Returns the path.
    Raises ValueError for another extension."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"save_single_file writes .safetensors or .ckpt, not {path.suffix!r}")
    state = {k: v.detach().contiguous().cpu()
             for k, v in single_file_state_dict(unet, vae, text_encoder).items()}
    if path.suffix == ".safetensors":
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, path)
    return path
