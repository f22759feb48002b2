"""`python -m minisd.training <what> [options]`: train minisd's models from the command line."""

from minisd.training import clip, unet, vae  # noqa: F401  (they register their commands)
from minisd.training.loop import main

main()
