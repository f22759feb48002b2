"""The files minisd reads at run time, and the one place that knows where they are.

The repository's `data/` folder (its README.md gives each file's source and licence) is
installed as the package `minisd.data` (pyproject.toml maps it), so a wheel carries it and
`pip install minisd` works outside the checkout. Everything else in minisd asks this module
for a path instead of building one:

- `bundled_model()`: the course's own text-to-image model, a diffusers folder;
- `course_unet()`: chapter 4's small U-Net, the bundled recipe trained for longer than the
  chapter's live run;
- `openai_vocab()`: OpenAI's CLIP byte-pair merges (SD v1's tokenizer);
- `sample_image(name)`: the sample photographs by name (`SAMPLE_IMAGES`).
"""

from importlib.resources import files
from pathlib import Path

SAMPLE_IMAGES = {"astronaut": "astronaut.jpg", "cat": "cat.jpg", "coffee": "coffee.jpg",
                 "rocket": "rocket.jpg"}
BUNDLED_MODEL_NAME = "minisd-shapes"
COURSE_UNET_NAME = "course/unet-small-2000steps"
OPENAI_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"


def data_dir() -> Path:
    """The installed `data/` folder (in a checkout installed with `pip install -e .`, the
    repository's own `data/`)."""
    return Path(str(files("minisd.data")))


def _existing(path: Path, what: str, remedy: str = "") -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} is missing from the installed package ({path}); "
                                f"{remedy}reinstall minisd (pip install .), or in a checkout "
                                "run `git status data/` to see whether it was deleted")
    return path


def bundled_model() -> Path:
    """The folder of the bundled model (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/). Raises FileNotFoundError if it is not installed."""
    return _existing(data_dir() / BUNDLED_MODEL_NAME / "model_index.json", "the bundled model",
                     "train it with `python -m minisd.training all`, or ").parent


def course_unet() -> Path:
    """The folder of chapter 4's stored checkpoint: the bundled U-Net's recipe
    (`minisd.training.unet`: v-prediction on SD v1's schedule rescaled to zero terminal SNR)
    at a small size, 16, 32, 32 channels, trained for 2,000 steps of 16 on the bundled VAE's
    latents and text encoder's context (data/README.md has the command). It holds `unet/`
    (config.json and float16 diffusion_pytorch_model.safetensors, latents (B, 4, 16, 16),
    context (B, 77, 128)): `UNet2DConditionModel.from_pretrained(course_unet(),
    subfolder="unet")`; it samples with the bundled model's VAE, tokenizer and text encoder and
    `minisd.training.unet.sampling_scheduler`. Raises FileNotFoundError if it is not installed."""
    return _existing(data_dir() / COURSE_UNET_NAME / "unet" / "config.json",
                     "chapter 4's small U-Net").parent.parent


def openai_vocab() -> Path:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz`. Raises FileNotFoundError if it is missing."""
    return _existing(data_dir() / OPENAI_VOCAB_NAME, "CLIP's BPE vocabulary")


def sample_image(name: str) -> Path:
    """The file of a sample photo by name ("astronaut", "cat", "coffee", "rocket").
    Raises KeyError listing the names for an unknown one."""
    if name not in SAMPLE_IMAGES:
        raise KeyError(f"no sample photo named {name!r}; the sample photos are "
                       f"{', '.join(SAMPLE_IMAGES)}")
    return _existing(data_dir() / SAMPLE_IMAGES[name], f"the sample photo {name!r}")
