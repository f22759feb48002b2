"""U-Net speed: minisd's UNet2DConditionModel against diffusers', SD v1 configuration.

    python benchmarks/bench_unet.py [--tiny] [--runs 3] [--threads N]

Both models hold the same random weights (minisd's, loaded into diffusers' with strict=True;
the tensors are shared, so the pair costs the memory of one: 3.4 GB in float32). One call
is one denoising step with guidance: batch 2, latents (2, 4, 32, 32) and (2, 4, 64, 64)
(256² and 512² pictures), t = 500, context (2, 77, 768); float32, inference mode. The two
outputs are compared (relative error) before timing. Writes benchmarks/results/unet.json.
"""

from functools import partial

import timing
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet

from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel

TINY = UNet2DConditionConfig(
    sample_size=16, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)


def make_pair(config: UNet2DConditionConfig):
    """minisd's U-Net with random weights and diffusers' sharing them."""
    torch.manual_seed(0)
    ours = UNet2DConditionModel(config).eval()
    kwargs = {k: v for k, v in config.to_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = DiffusersUNet(**kwargs)
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ours, reference.eval()


def main(argv=None):
    args = timing.parse(timing.parser("unet", __doc__.splitlines()[0]), argv)
    config = TINY if args.tiny else UNet2DConditionConfig()
    sizes = (8, 16) if args.tiny else (32, 64)
    ours, reference = make_pair(config)
    results = []
    with torch.inference_mode():
        for size in sizes:
            generator = torch.Generator().manual_seed(size)
            sample = torch.randn(2, config.in_channels, size, size, generator=generator)
            context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
            t = torch.tensor(500)
            error = timing.relative_error(ours(sample, t, context),
                                          reference(sample, t, context).sample)
            result = timing.compare(partial(ours, sample, t, context),
                                    partial(reference, sample, t, context),
                                    args.runs, args.warmup)
            results.append({"case": f"latent 2x{config.in_channels}x{size}x{size}",
                            "latent": [2, config.in_channels, size, size],
                            "context": [2, 77, config.cross_attention_dim],
                            "relative_error": error, **result})
            print(f"latent {size}x{size} done: ratio {result['ratio']:.3f}, "
                  f"relative error {error:.1e}", flush=True)
    payload = {"benchmark": "unet", "reference": "diffusers.UNet2DConditionModel",
               "config": "tiny" if args.tiny else "SD v1", "dtype": "float32",
               "parameters": sum(p.numel() for p in ours.parameters()),
               "results": results, **timing.environment()}
    print(timing.table([timing.comparison_row(r["case"], r) for r in results],
                       timing.COMPARISON_COLUMNS))
    timing.write(args.out, payload)


if __name__ == "__main__":
    main()
