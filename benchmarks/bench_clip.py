"""Text encoder speed: minisd's CLIPTextModel against transformers', SD v1 configuration.

    python benchmarks/bench_clip.py [--tiny] [--runs 3] [--threads N]

CLIP ViT-L/14's text tower (12 layers, width 768) with random weights, the same in both
(transformers' loaded into minisd's, shared). One call encodes a batch of 2 × 77 token ids
(a prompt and the empty negative prompt, tokenised with OpenAI's vocabulary, as a guided
pipeline does); float32, inference mode. The last hidden states are compared (relative
error) before timing. Writes benchmarks/results/clip.json.
"""

import timing
import torch
import transformers

from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import CLIPTokenizer

TINY = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, projection_dim=16,
                      num_hidden_layers=3, num_attention_heads=4, pad_token_id=0,
                      bos_token_id=98, eos_token_id=99)
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def make_pair(config: CLIPTextConfig):
    """transformers' CLIPTextModel with random weights and minisd's sharing them."""
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_config()))
    ours = CLIPTextModel(config)
    ours.load_state_dict(reference.state_dict(), assign=True)
    return ours.eval(), reference.eval()


def token_ids(config: CLIPTextConfig, tiny: bool) -> torch.Tensor:
    """(2, 77) ids: the tokenised PROMPTS, or for the tiny vocabulary BOS, random ids, EOS."""
    if not tiny:
        return CLIPTokenizer.openai()(PROMPTS)
    ids = torch.randint(1, config.bos_token_id, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1], ids[1, 5:] = config.bos_token_id, config.eos_token_id, 0
    ids[1, 4] = config.eos_token_id
    return ids


def main(argv=None):
    args = timing.parse(timing.parser("clip", __doc__.splitlines()[0]), argv)
    config = TINY if args.tiny else CLIPTextConfig.sd_v1()
    ours, reference = make_pair(config)
    ids = token_ids(config, args.tiny)
    with torch.inference_mode():
        error = timing.relative_error(ours(ids).last_hidden_state,
                                      reference(ids).last_hidden_state)
        result = timing.compare(lambda: ours(ids), lambda: reference(ids), args.runs,
                                args.warmup)
    case = f"encode {ids.shape[0]}x{ids.shape[1]} ids"
    results = [{"case": case, "input_ids": list(ids.shape), "relative_error": error, **result}]
    print(f"relative error {error:.1e}")
    payload = {"benchmark": "clip_text", "reference": "transformers.CLIPTextModel",
               "attention": reference.config._attn_implementation,
               "config": "tiny" if args.tiny else "SD v1 (CLIP ViT-L/14 text)",
               "dtype": "float32", "parameters": sum(p.numel() for p in ours.parameters()),
               "results": results, **timing.environment()}
    print(timing.table([timing.comparison_row(case, results[0])], timing.COMPARISON_COLUMNS))
    timing.write(args.out, payload)


if __name__ == "__main__":
    main()
