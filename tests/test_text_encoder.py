"""CLIPTextModel: parity with transformers' CLIPTextModel (small random config and SD v1's),
the SD v1 parameter count, pooling at the first EOS, clip skip, state-dict layouts
, attention recording, saving and loading, bad input."""

import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from minisd.attention import record_attention
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import CLIPTokenizer

SMALL = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 16,
         "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 16,
         "pad_token_id": 0, "bos_token_id": 98, "eos_token_id": 99}

# the architecture and special-token fields of an SD v1.x text_encoder/config.json, with the
# legacy eos_token_id 2 these files carry, and keys that are not CLIPTextConfig fields
SD_V1 = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "dropout": 0.0,
         "attention_dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 768,
         "intermediate_size": 3072, "initializer_factor": 1.0, "initializer_range": 0.02,
         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12,
         "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
         "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32"}


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def small_pair(**changes):
    """A random transformers CLIPTextModel and ours with the same weights."""
    torch.manual_seed(0)
    config = {**SMALL, **changes}
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    ours = CLIPTextModel(CLIPTextConfig.from_config(config)).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def small_ids():
    """(4, 16): BOS 98, random ids below 98, EOS 99, then padding with EOS, with 0, or none."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 98, (4, 16), generator=generator)
    ids[:, 0] = 98
    ids[0, 5:] = 99          # padded with EOS
    ids[1, 9], ids[1, 10:] = 99, 0   # padded with 0
    ids[2, 15] = 99          # full length
    ids[3, 1] = 99           # empty prompt
    return ids


def test_sd_v1_has_123_060_480_parameters():
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.sd_v1())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    assert CLIPTextConfig.from_config(SD_V1) == CLIPTextConfig(
        **{**CLIPTextConfig.sd_v1().to_config(), "bos_token_id": 0, "eos_token_id": 2})


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_parity_small_random_config(hidden_act, attention):
    reference, ours = small_pair(hidden_act=hidden_act)
    reference.config._attn_implementation = attention
    ids = small_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        got = ours(ids)
    close(got.last_hidden_state, expected.last_hidden_state)
    close(got.pooler_output, expected.pooler_output)
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    for a, b in zip(got.hidden_states, expected.hidden_states):
        close(a, b)


def test_parity_sd_v1_config():
    """SD v1's configuration with the real vocabulary's ids; the legacy eos_token_id 2 makes
    transformers pool at the highest id, which is the first EOS for tokenizer output."""
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD_V1)).eval()
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig.from_config(SD_V1))
    ours.load_state_dict(reference.state_dict(), assign=True)
    ours.eval()
    ids = CLIPTokenizer.openai()(["a photo of a cat", "an astronaut riding a horse, 4k"])
    with torch.no_grad():
        expected, got = reference(ids), ours(ids)
    assert got.last_hidden_state.shape == (2, 77, 768) and got.pooler_output.shape == (2, 768)
    close(got.last_hidden_state, expected.last_hidden_state)
    close(got.pooler_output, expected.pooler_output)


def test_pooler_reads_the_first_eos_not_the_largest_id():
    _, ours = small_pair(eos_token_id=50)
    ids = torch.tensor([[98, 7, 50, 97, 50, 50], [98, 50, 99, 99, 0, 0]])
    with torch.no_grad():
        out = ours(ids)
    close(out.pooler_output, out.last_hidden_state[[0, 1], [2, 1]])
    largest = ids.argmax(dim=1)
    assert largest.tolist() == [0, 2]
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[[0, 1], largest])


def test_clip_skip():
    reference, ours = small_pair()
    ids = small_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        skip1, skip2 = ours(ids, clip_skip=1), ours(ids, clip_skip=2)
        penultimate_normed = reference.final_layer_norm(expected.hidden_states[-2])
    close(skip1.last_hidden_state, expected.last_hidden_state)
    close(skip2.last_hidden_state, penultimate_normed)
    close(skip2.pooler_output, expected.pooler_output)
    assert not torch.allclose(skip2.last_hidden_state, skip1.last_hidden_state, atol=1e-3)
    assert not torch.allclose(skip1.hidden_states[-1], skip1.last_hidden_state, atol=1e-3)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"clip_skip={bad}"):
            ours(ids, clip_skip=bad)


def test_prefix_and_position_ids_variants_load_the_same():
    reference, ours = small_pair()
    plain = reference.state_dict()
    variants = [plain, {"embeddings.position_ids": torch.arange(16)[None], **plain},
                {"text_model." + k: v for k, v in plain.items()},
                {"text_model.embeddings.position_ids": torch.arange(16)[None],
                 **{"text_model." + k: v for k, v in plain.items()}}]
    ids = small_ids()
    expected = ours(ids).last_hidden_state
    for state in variants:
        model = CLIPTextModel(CLIPTextConfig.from_config(SMALL))
        model.load_state_dict(state)
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, plain[key]), key
        close(model(ids).last_hidden_state, expected)


def test_other_keys_fail_naming_them():
    reference, ours = small_pair()
    plain = reference.state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys: text_model\.logit_scale"):
        ours.load_state_dict({**plain, "text_model.logit_scale": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"unexpected keys: cond_stage_model\.transformer"):
        ours.load_state_dict({"cond_stage_model.transformer." + k: v for k, v in plain.items()})
    truncated = {k: v for k, v in plain.items() if not k.startswith("encoder.layers.2.")}
    with pytest.raises(ValueError, match=r"missing keys: .*encoder\.layers\.2\.layer_norm1\.bias"):
        ours.load_state_dict(truncated)
    wrong = {**plain, "final_layer_norm.weight": torch.ones(8)}
    with pytest.raises(ValueError, match=r"shape mismatches: final_layer_norm\.weight \(8,\) \(model: \(32,\)\)"):
        ours.load_state_dict(wrong)


def test_attention_goes_through_the_shared_attention_and_can_be_recorded():
    _, ours = small_pair()
    ids = small_ids()
    with torch.no_grad():
        fused = ours(ids).last_hidden_state
        with record_attention(ours) as rec:
            recorded = ours(ids).last_hidden_state
    close(recorded, fused)
    assert [name for name, _ in rec.maps] == [f"encoder.layers.{i}.self_attn" for i in range(3)]
    probs = rec.maps[0][1]
    assert probs.shape == (4, 4, 16, 16)
    assert torch.all(probs.triu(diagonal=1) == 0)        # causal: no look at later tokens
    close(probs.sum(-1), torch.ones(4, 4, 16))


def test_save_and_load_folder(tmp_path):
    reference, ours = small_pair()
    ours.save_pretrained(tmp_path / "text_encoder")
    keys = load_file(tmp_path / "text_encoder" / "model.safetensors").keys()
    assert all(k.startswith("text_model.") for k in keys) and len(keys) == 52
    config = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["eos_token_id"] == 99
    ids = small_ids()
    with torch.no_grad():
        expected = ours(ids).last_hidden_state
        close(CLIPTextModel.from_pretrained(tmp_path / "text_encoder")(ids).last_hidden_state,
              expected)
        loaded_by_transformers = transformers.CLIPTextModel.from_pretrained(
            tmp_path / "text_encoder")
        close(loaded_by_transformers(ids).last_hidden_state, expected)
    reference.save_pretrained(tmp_path / "saved_by_transformers")
    with torch.no_grad():
        close(CLIPTextModel.from_pretrained(tmp_path / "saved_by_transformers")(ids)
              .last_hidden_state, expected)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(FileNotFoundError, match="no_weights has no model.safetensors"):
        CLIPTextModel.from_pretrained(tmp_path / "no_weights")


def test_bad_input():
    _, ours = small_pair()
    with pytest.raises(ValueError, match="17 tokens, but the model has only 16 positions"):
        ours(torch.full((1, 17), 99))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\)"):
        ours(torch.tensor([[98, 100, 99]]))
    with pytest.raises(ValueError, match="no end-of-text id 99"):
        ours(torch.tensor([[98, 5, 6]]))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        CLIPTextModel(CLIPTextConfig(hidden_act="relu"))


def test_bad_ids_name_the_problem_and_the_fix():
    _, ours = small_pair()
    ids = torch.tensor([[98, 5, 99]])
    # float ids are refused as such, not reported as "no end-of-text id"
    with pytest.raises(TypeError, match=r"integer token ids \(int64\), got torch.float32; "
                                        r"make them with CLIPTokenizer, or convert with ids.long"):
        ours(ids.float())
    with pytest.raises(TypeError, match="got torch.bool"):
        ours(ids.bool())
    with pytest.raises(TypeError, match="must be a torch.Tensor of token ids .* got list"):
        ours(ids.tolist())
    with pytest.raises(ValueError, match=r"shape \(B, L\), got \(3,\); for one prompt use "
                                         r"ids\[None\]"):
        ours(ids[0])
    with pytest.raises(ValueError, match=r"shape \(B, L\), got \(1, 1, 3\)"):
        ours(ids[None])
    for empty in (torch.zeros(0, 3, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match=rf"input_ids is empty, shape \({empty.shape[0]}, "
                                             rf"{empty.shape[1]}\); give at least one prompt"):
            ours(empty)
    # other integer dtypes are fine and give the same result as int64
    close(ours(ids.int()).last_hidden_state, ours(ids).last_hidden_state)


@pytest.mark.parametrize("bad", [2.0, "2", True, None])
def test_clip_skip_must_be_an_int(bad):
    _, ours = small_pair()
    with pytest.raises(TypeError, match=rf"clip_skip must be an int from 1 \(last layer\) to 3, "
                                        rf"got {re.escape(repr(bad))}"):
        ours(torch.tensor([[98, 5, 99]]), clip_skip=bad)


def test_the_causal_attention_needs_no_padding_mask():
    """"a red circle" padded with EOS (SD v1), the same padded with 0, and without padding:
    every position up to and including EOS and the pooled vector are the same in all three,
    and equal transformers' CLIPTextModel on the same weights; only the padding differs.
    No mask is needed because token i attends to tokens ≤ i (openai/CLIP #183)."""
    reference, ours = small_pair(vocab_size=49408, max_position_embeddings=77,
                                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    padded = CLIPTokenizer.openai()("a red circle")
    assert padded[0, :6].tolist() == [49406, 320, 736, 7117, 49407, 49407]
    zeros = padded.clone()
    zeros[0, 5:] = 0
    unpadded = padded[:, :5]
    with torch.no_grad():
        outputs = [(ours(ids), reference(ids)) for ids in (padded, zeros, unpadded)]
    first = outputs[0][0]
    for mine, theirs in outputs:
        close(mine.last_hidden_state[:, :5], first.last_hidden_state[:, :5])
        close(mine.pooler_output, first.pooler_output)
        close(mine.last_hidden_state, theirs.last_hidden_state)
        close(mine.pooler_output, theirs.pooler_output)
    # the test can fail: the padding positions themselves do differ
    assert (outputs[0][0].last_hidden_state[:, 5:]
            - outputs[1][0].last_hidden_state[:, 5:]).abs().max() > 1e-2


def test_forward_passes_read_no_values_from_the_device():
    """No device sync per call: the model runs on the `meta` device, where any .item(),
    bool() or int() of a tensor raises, so the forward pass has no such step."""
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_config(SMALL))
        ids = torch.zeros(2, 16, dtype=torch.long)
    out = model(ids, clip_skip=2)
    assert out.last_hidden_state.shape == (2, 16, 32) and out.pooler_output.shape == (2, 32)
