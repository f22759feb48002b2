"""The files minisd reads at run time, and the one place that knows where they are.

The repository's `data/` folder (its README.md gives each file's source and licence) is
installed as the package `minisd.data` (pyproject.toml maps it), so a wheel carries it and
`pip install minisd` works outside the checkout. Everything else in minisd asks this module
for a path instead of building one:

- `bundled_model()`: the course's own text-to-image model, a diffusers folder;
- `openai_vocab()`: OpenAI's CLIP byte-pair merges (SD v1's tokenizer);
- `sample_image(name)`: the sample photographs by name (`SAMPLE_IMAGES`).
"""

from importlib.resources import files
from pathlib import Path

SAMPLE_IMAGES = {"astronaut": "astronaut.jpg", "cat": "cat.jpg", "coffee": "coffee.jpg",
                 "rocket": "rocket.jpg"}
BUNDLED_MODEL_NAME = "minisd-shapes"
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
