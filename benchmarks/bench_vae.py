"""VAE decode speed: minisd's AutoencoderKL against diffusers', SD v1 configuration.

    python benchmarks/bench_vae.py [--tiny] [--runs 3] [--threads N]

Both decoders hold the same random weights (minisd's, loaded into diffusers' with
strict=True; the tensors are shared). One call decodes one latent (1, 4, 32, 32) → a 256²
picture, or (1, 4, 64, 64) → 512²; float32, inference mode. The two outputs are compared
(relative error) before timing. Writes benchmarks/results/vae.json.
"""

from functools import partial

import timing
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from minisd.vae import AutoencoderKL, AutoencoderKLConfig

TINY = AutoencoderKLConfig(block_out_channels=(32, 64, 64),
                           down_block_types=("DownEncoderBlock2D",) * 3,
                           up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2,
                           norm_num_groups=16, sample_size=32)


def make_pair(config: AutoencoderKLConfig):
    """minisd's VAE with random weights and diffusers' sharing them."""
    torch.manual_seed(0)
    ours = AutoencoderKL(config).eval()
    kwargs = {k: v for k, v in config.to_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**kwargs)
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ours, reference.eval()


def main(argv=None):
    args = timing.parse(timing.parser("vae", __doc__.splitlines()[0]), argv)
    config = TINY if args.tiny else AutoencoderKLConfig.sd_v1()
    sizes = (8, 16) if args.tiny else (32, 64)
    ours, reference = make_pair(config)
    f = ours.downsampling_factor
    results = []
    with torch.inference_mode():
        for size in sizes:
            z = torch.randn(1, config.latent_channels, size, size,
                            generator=torch.Generator().manual_seed(size))
            error = timing.relative_error(ours.decode(z), reference.decode(z).sample)
            result = timing.compare(partial(ours.decode, z), partial(reference.decode, z),
                                    args.runs, args.warmup)
            results.append({"case": f"decode 1x{config.latent_channels}x{size}x{size} → "
                                    f"{size * f}x{size * f}",
                            "latent": [1, config.latent_channels, size, size],
                            "relative_error": error, **result})
            print(f"latent {size}x{size} done: ratio {result['ratio']:.3f}, "
                  f"relative error {error:.1e}", flush=True)
    payload = {"benchmark": "vae_decode", "reference": "diffusers.AutoencoderKL",
               "config": "tiny" if args.tiny else "SD v1", "dtype": "float32",
               "parameters": sum(p.numel() for p in ours.decoder.parameters()),
               "results": results, **timing.environment()}
    print(timing.table([timing.comparison_row(r["case"], r) for r in results],
                       timing.COMPARISON_COLUMNS))
    timing.write(args.out, payload)


if __name__ == "__main__":
    main()
