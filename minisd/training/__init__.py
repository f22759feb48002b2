"""Training minisd's own models on a CPU (or GPUs), one module per job:

- `loop`: the one training loop (`train`, `TrainConfig`: AdamW, warm-up + cosine, gradient
  clipping, EMA, checkpoints and exact resume, DDP under torchrun);
- `ema`: the exponential moving average of the weights;
- `vae`, `clip`, `unet`: one recipe per model of the bundled text-to-image model, each with
  its settings in one dataclass (`VAETrainConfig`, `CLIPTrainConfig`, `UNetTrainConfig`);
- `stages`: `all`, the whole bundled model in one command;
- `__main__`: the command line, `python -m minisd.training vae|clip|unet|all`, built from
  those dataclasses (`main([...])` runs it from Python).
"""
