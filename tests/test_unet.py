"""minisd.unet: parameter count, parity with diffusers' UNet2DConditionModel (small configs,
SD v1 on a small latent, odd latent sizes), stage shapes, config and checkpoint handling,
bad inputs."""

import gc
import json

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file

from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel, timestep_embedding

# SD-v1-like in miniature: conv projections, attention in the two upper levels.
SMALL = UNet2DConditionConfig(
    sample_size=16, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4)
# The kind the bundled CPU model uses: no attention at full resolution, cross-attention only
# one level down, self-attention below; plus per-level depths, linear projections (SD v2).
CPU_STYLE = UNet2DConditionConfig(
    sample_size=16, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(False, True, False), layers_per_block=(1, 2, 1),
    transformer_layers_per_block=(1, 2, 1), attention_head_dim=(2, 4, 8), norm_num_groups=8,
    cross_attention_dim=24, use_linear_projection=True, mid_block_scale_factor=1.5)


def diffusers_kwargs(config: UNet2DConditionConfig) -> dict:
    return {k: v for k, v in config.to_config().items() if not k.startswith("_")}


def make_pair(config: UNet2DConditionConfig):
    """A randomly initialised minisd U-Net and a diffusers one sharing its weights (strict)."""
    torch.manual_seed(0)
    ours = UNet2DConditionModel(config).eval()
    with torch.device("meta"):
        ref = DiffusersUNet(**diffusers_kwargs(config))
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ours, ref.eval()


def max_difference(ours, ref, batch, height, width, context_len=7):
    torch.manual_seed(1)
    config = ours.config
    sample = torch.randn(batch, config.in_channels, height, width)
    context = torch.randn(batch, context_len, config.cross_attention_dim)
    t = torch.linspace(3, 950, batch).long()
    with torch.no_grad():
        out = ours(sample, t, context)
        expected = ref(sample, t, context).sample
    assert out.shape == sample.shape[:1] + (config.out_channels,) + sample.shape[2:]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    return (out - expected).abs().max().item()


def test_sd_v1_has_859_520_964_parameters():
    with torch.device("meta"):
        model = UNet2DConditionModel()
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_defaults_are_sd_v1_as_diffusers_writes_it():
    with torch.device("meta"):
        ref = DiffusersUNet(cross_attention_dim=768, sample_size=64)
    assert UNet2DConditionConfig.from_config(dict(ref.config)) == UNet2DConditionConfig()


@pytest.mark.parametrize("config", [SMALL, CPU_STYLE], ids=["small", "cpu_style"])
@pytest.mark.parametrize("height,width,batch", [(16, 16, 2), (8, 11, 2), (64, 85, 1)])
def test_small_configs_match_diffusers(config, height, width, batch):
    ours, ref = make_pair(config)
    max_difference(ours, ref, batch, height, width)


def test_sd_v1_matches_diffusers_on_a_small_latent():
    ours, ref = make_pair(UNet2DConditionConfig())
    max_difference(ours, ref, batch=2, height=16, width=16, context_len=77)
    del ours, ref
    gc.collect()


def test_heads_come_from_attention_head_dim():
    # diffusers' U-Net reads attention_head_dim as the number of heads: SD v1 has 8 heads
    # of 40 channels at 320, of 160 at 1280.
    with torch.device("meta"):
        model = UNet2DConditionModel()
    top = model.down_blocks[0].attentions[0].transformer_blocks[0]
    mid = model.mid_block.attentions[0].transformer_blocks[0]
    assert (top.attn1.heads, top.attn1.to_q.out_features) == (8, 320)
    assert (mid.attn2.heads, mid.attn2.to_k.in_features, mid.attn2.to_q.out_features) \
        == (8, 768, 1280)
    with pytest.raises(ValueError, match="num_attention_heads must be None"):
        UNet2DConditionConfig(num_attention_heads=8)


@pytest.mark.parametrize("height,width", [(64, 64), (8, 11)])
def test_sd_v1_stage_shapes(height, width):
    """The shapes listed in UNet2DConditionModel's docstring, odd sizes rounding up."""
    with torch.device("meta"):
        model = UNet2DConditionModel()
        shapes = {}
        stages = {"conv_in": model.conv_in, "mid_block": model.mid_block,
                  **{f"down_blocks.{i}": b for i, b in enumerate(model.down_blocks)},
                  **{f"up_blocks.{i}": b for i, b in enumerate(model.up_blocks)}}
        for name, module in stages.items():
            module.register_forward_hook(
                lambda m, args, out, name=name: shapes.__setitem__(
                    name, tuple((out[0] if isinstance(out, tuple) else out).shape)))
        out = model(torch.empty(2, 4, height, width), 999, torch.empty(2, 77, 768))

    def half(n, times):
        for _ in range(times):
            n = -(-n // 2)
        return n

    def at(channels, level):
        return (2, channels, half(height, level), half(width, level))

    assert shapes == {
        "conv_in": at(320, 0),
        "down_blocks.0": at(320, 1), "down_blocks.1": at(640, 2),
        "down_blocks.2": at(1280, 3), "down_blocks.3": at(1280, 3),
        "mid_block": at(1280, 3),
        "up_blocks.0": at(1280, 2), "up_blocks.1": at(1280, 1),
        "up_blocks.2": at(640, 0), "up_blocks.3": at(320, 0),
    }
    assert out.shape == (2, 4, height, width)


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0, 1, 250.5, 999])
    for dim, flip, shift in [(320, True, 0), (7, True, 0), (64, False, 1)]:
        torch.testing.assert_close(
            timestep_embedding(t, dim, flip, shift),
            get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift),
            rtol=0, atol=1e-6)
    # SD's order is [cos, sin]: at t = 0 the first half is 1, the second 0.
    emb = timestep_embedding(torch.tensor([0]), 320)
    assert emb[0, :160].eq(1).all() and emb[0, 160:].eq(0).all()


def test_timestep_forms_agree():
    torch.manual_seed(0)
    model = UNet2DConditionModel(SMALL).eval()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = model(sample, torch.tensor([500, 500]), context)
        for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500.0])):
            torch.testing.assert_close(model(sample, t, context), expected, rtol=0, atol=0)
        per_sample = model(sample, torch.tensor([10, 900]), context)
        first_alone = model(sample[:1], 10, context[:1])
    torch.testing.assert_close(per_sample[:1], first_alone, rtol=0, atol=1e-5)
    assert not torch.allclose(per_sample, expected)


def test_bad_inputs_raise_clear_errors():
    model = UNet2DConditionModel(SMALL).eval()
    context = torch.randn(2, 5, 24)
    with pytest.raises(ValueError, match=r"sample must have shape \(B, 4, H, W\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), 1, context)
    with pytest.raises(ValueError, match="sample must have shape"):
        model(torch.randn(4, 8, 8), 1, context)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \(B, M, 24\), "
                                         r"got \(2, 5, 32\).*cross_attention_dim"):
        model(torch.randn(2, 4, 8, 8), 1, torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="batch sizes differ: sample has 2, "
                                         "encoder_hidden_states has 3"):
        model(torch.randn(2, 4, 8, 8), 1, torch.randn(3, 5, 24))
    with pytest.raises(ValueError, match=r"timestep must be a number or have shape \(2,\), "
                                         r"got shape \(3,\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), context)


def test_config_reads_diffusers_json_and_refuses_what_it_cannot_build():
    data = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
            "some_future_key": 1, **json.loads(json.dumps(SMALL.to_config()))}
    config = UNet2DConditionConfig.from_config(data)
    assert config == SMALL and isinstance(config.block_out_channels, tuple)
    assert UNet2DConditionConfig.from_config(CPU_STYLE.to_config()) == CPU_STYLE
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNet2DConditionConfig.from_config({**data, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="addition_embed_type='text_time' is not supported"):
        UNet2DConditionConfig.from_config({**data, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="unknown down_block_types entry 'SimpleDown'"):
        UNet2DConditionConfig(down_block_types=("SimpleDown",) * 4)
    with pytest.raises(ValueError, match="must have the same length"):
        UNet2DConditionConfig(block_out_channels=(320, 640))
    with pytest.raises(ValueError, match="layers_per_block has 2 entries for 4 levels"):
        UNet2DConditionConfig(layers_per_block=(2, 2))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=32"):
        UNet2DConditionConfig(block_out_channels=(48, 64, 64, 64))


def test_save_and_load_both_ways_with_diffusers(tmp_path):
    ours, ref = make_pair(CPU_STYLE)
    ours.save_pretrained(tmp_path / "ours" / "unet")
    ref.save_pretrained(tmp_path / "theirs")
    mine_in_diffusers = DiffusersUNet.from_pretrained(tmp_path / "ours" / "unet").eval()
    theirs_in_minisd = UNet2DConditionModel.from_pretrained(tmp_path / "theirs").eval()
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "ours")  # finds unet/ inside
    assert reloaded.config == CPU_STYLE and theirs_in_minisd.config == CPU_STYLE
    max_difference(ours, mine_in_diffusers, 2, 8, 8)
    max_difference(theirs_in_minisd, ref, 2, 8, 8)
    half = UNet2DConditionModel.from_pretrained(tmp_path / "theirs", torch_dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_foreign_or_broken_checkpoints_fail_naming_the_keys(tmp_path):
    model = UNet2DConditionModel(SMALL)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)

    broken = dict(state)
    del broken["conv_in.weight"]
    broken["class_embedding.linear_1.weight"] = torch.zeros(1)
    broken["conv_out.bias"] = torch.zeros(5)
    save_file(broken, weights)
    with pytest.raises(ValueError) as error:
        UNet2DConditionModel.from_pretrained(tmp_path)
    message = str(error.value)
    assert "1 missing keys: conv_in.weight" in message
    assert "1 unexpected keys: class_embedding.linear_1.weight" in message
    assert "1 shape mismatches: conv_out.bias (5,) (model: (4,))" in message

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_forward_reads_no_values_from_the_device():
    """The checks at the entry look at shapes only: the U-Net runs on the `meta` device,
    where reading a tensor's value (.item(), bool()) raises, with every form of timestep."""
    with torch.device("meta"):
        model = UNet2DConditionModel(SMALL)
        sample, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 7, SMALL.cross_attention_dim)
    for t in (10, 10.5, torch.tensor(10, device="meta"), torch.zeros(2, device="meta")):
        assert model(sample, t, context).shape == (2, 4, 8, 8)
