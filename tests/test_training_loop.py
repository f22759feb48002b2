"""Tests of the shared training loop (minisd.training.loop) and the EMA (minisd.training.ema).
The command line is tested in test_training_cli.py, a recipe under torchrun in
test_training_unet.py."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import torchrun
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from minisd.training.ema import EMA
from minisd.training.loop import TrainConfig, init_distributed, latest_checkpoint, lr_at, train


def regression_data(n: int = 20) -> TensorDataset:
    """y = x·[1, −2, 0.5] + 0.3 on n samples of x ~ N(0, 1)³."""
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def noisy_mse(model, batch):
    """Draws from torch's global RNG, as a diffusion loss does, and returns an extra term."""
    x, y = batch
    prediction = model(x + 0.1 * torch.randn_like(x))
    return {"loss": F.mse_loss(prediction, y), "mae": (prediction - y).abs().mean()}


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "lr": 0.02, "progress": False, "device": "cpu",
                          **overrides})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=atol, msg=key)


# The loop itself


def test_loss_falls_on_a_tiny_mlp():
    config = quiet(steps=150, warmup_steps=10)
    result = train(mlp(), mse, regression_data(), config)
    losses = result.history["loss"]
    assert len(losses) == 150 and result.step == 150
    assert result.history["step"] == list(range(150))
    assert result.history["lr"] == [lr_at(s, config) for s in range(150)]
    assert sum(losses[-10:]) / 10 < 0.05 * losses[0], (losses[0], losses[-10:])
    assert result.ema_model is None and result.checkpoint is None


def test_train_equals_a_hand_written_loop():
    """Data order (permutation from seed + epoch, last incomplete batch dropped), learning
    rate, clipping, and weight decay on matrices only, against the loop written out."""
    config = quiet(steps=6, warmup_steps=2, weight_decay=0.5, grad_clip=0.5, seed=4)
    data = regression_data()
    result = train(mlp(), mse, data, config)

    model = mlp()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.5},
                                   {"params": vectors, "weight_decay": 0.0}])
    norms = []
    for step in range(6):
        epoch, b = divmod(step, 20 // 8)
        order = torch.randperm(20, generator=torch.Generator().manual_seed(4 + epoch))
        x, y = data[order[b * 8:(b + 1) * 8]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
        optimizer.step()

    assert max(norms) > 0.5  # clipping happened
    assert result.history["grad_norm"] == pytest.approx(norms, rel=1e-6)
    assert_equal_weights(weights(result.model), weights(model), atol=1e-7)


def test_worker_processes_do_not_change_the_run():
    in_process = train(mlp(), noisy_mse, regression_data(), quiet(steps=5))
    workers = train(mlp(), noisy_mse, regression_data(), quiet(steps=5, num_workers=2))
    assert workers.history == in_process.history
    assert_equal_weights(weights(workers.model), weights(in_process.model))


def test_progress_false_writes_nothing(capfd):
    train(mlp(), noisy_mse, regression_data(), quiet(steps=20, ema_decay=0.9))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    train(mlp(), noisy_mse, regression_data(), quiet(steps=20, progress=True))
    out, err = capfd.readouterr()
    assert out == "" and "20/20" in err  # the bar goes to stderr


def test_bad_inputs_raise_clear_errors():
    data = regression_data()
    with pytest.raises(TypeError, match="map-style torch Dataset"):
        train(mlp(), mse, list(data), quiet(steps=1))
    with pytest.raises(ValueError, match="20 samples, fewer than one batch of 32"):
        train(mlp(), mse, data, quiet(steps=1, batch_size=32))
    with pytest.raises(TypeError, match="scalar"):
        train(mlp(), lambda m, b: (m(b[0]) - b[1]) ** 2, data, quiet(steps=1))
    with pytest.raises(TypeError, match="'loss' key"):
        train(mlp(), lambda m, b: {"mse": mse(m, b)}, data, quiet(steps=1))
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(mlp().requires_grad_(False), mse, data, quiet(steps=1))

    model = mlp()
    before = weights(model)
    with pytest.raises(FloatingPointError, match="nan at step 0"):
        train(model, lambda m, b: mse(m, b) * float("nan"), data, quiet(steps=1))
    assert_equal_weights(weights(model), before)  # not updated


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"schedule": "linear"}, "schedule must be one of cosine, constant"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ({"min_lr": 0.1, "lr": 0.01}, r"min_lr must be in \[0, lr\]"),
    ({"grad_clip": 0.0}, "grad_clip must be positive or None"),
    ({"resume": True}, "resume must be False when out_dir is None"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


# Learning-rate schedule


def test_schedule_values_exact():
    cosine = TrainConfig(steps=110, lr=2.0, warmup_steps=10)
    # warm-up: lr·(step + 1)/10
    assert [lr_at(s, cosine) for s in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0], rel=1e-15)
    # cosine: 1 + cos(π·(step − 10)/100)
    assert lr_at(10, cosine) == 2.0
    assert lr_at(35, cosine) == pytest.approx(1.7071067811865475, rel=1e-15)  # 1 + √2/2
    assert lr_at(60, cosine) == pytest.approx(1.0, rel=1e-15)
    assert lr_at(109, cosine) == pytest.approx(4.934396342684e-4, rel=1e-12)  # 1 − cos(0.01π)

    floor = TrainConfig(steps=110, lr=2.0, warmup_steps=10, min_lr=0.5)
    assert lr_at(60, floor) == pytest.approx(1.25, rel=1e-15)  # 0.5 + 0.75·(1 + 0)

    constant = TrainConfig(steps=110, lr=2.0, warmup_steps=10, schedule="constant")
    assert lr_at(4, constant) == 1.0
    assert [lr_at(s, constant) for s in (9, 10, 60, 109)] == [2.0] * 4

    no_warmup = TrainConfig(steps=4, lr=1.0)
    assert [lr_at(s, no_warmup) for s in range(4)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.sqrt(0.5), 0.5, 0.5 - 0.5 * math.sqrt(0.5)], rel=1e-15)


# EMA


def scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False).double()
    model.register_buffer("count", torch.zeros(()))
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_ema_math_exact():
    model = scalar_model(0.0)
    ema = EMA(model, decay=0.5, warmup=False)
    expected = []
    for value in (1.0, 2.0, -1.0):  # θ̄ ← ½θ̄ + ½θ: 0.5, 1.25, 0.125
        model.weight.data.fill_(value)
        model.count += 1
        ema.update(model)
        expected.append(ema.model.weight.item())
    assert expected == [0.5, 1.25, 0.125]
    assert ema.model.count.item() == 3.0  # buffers copied, not averaged
    assert ema.num_updates == 3 and not ema.model.weight.requires_grad and not ema.model.training


def test_ema_decay_warmup_exact():
    model = scalar_model(0.0)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == 0.1  # (1 + 0)/(10 + 0)
    model.weight.data.fill_(1.0)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.9, abs=1e-15)  # 0.1·0 + 0.9·1
    assert ema.current_decay() == 2 / 11
    model.weight.data.fill_(2.0)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(2 / 11 * 0.9 + 9 / 11 * 2, abs=1e-15)
    ema.num_updates = 90
    assert ema.current_decay() == 0.91
    ema.num_updates = 8990  # (1 + n)/(10 + n) reaches 0.999 here
    assert ema.current_decay() == pytest.approx(0.999, rel=1e-15)
    ema.num_updates = 100_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\), got 1.0"):
        EMA(model, decay=1.0)


def test_ema_in_train_follows_the_weights(tmp_path):
    """θ̄_2 = lerp(lerp(θ_0, θ_1, 0.9), θ_2, 9/11) from the checkpoints of steps 1 and 2."""
    model = mlp()
    start = weights(model)
    config = quiet(steps=2, ema_decay=0.999, out_dir=str(tmp_path), checkpoint_every=1)
    result = train(model, mse, regression_data(), config)
    after_1 = load_file(tmp_path / "checkpoint-0000001" / "model.safetensors")
    after_2 = weights(result.model)
    expected = {k: start[k].lerp(after_1[k], 0.9).lerp(after_2[k], 9 / 11) for k in start}
    assert_equal_weights(weights(result.ema_model), expected, atol=1e-7)
    saved = load_file(tmp_path / "checkpoint-0000002" / "ema.safetensors")
    assert_equal_weights(saved, weights(result.ema_model))


# Checkpoints and resume


class Crash(Exception):
    pass


def crash_after(calls: int):
    count = [0]

    def loss_fn(model, batch):
        count[0] += 1
        if count[0] > calls:
            raise Crash
        return noisy_mse(model, batch)
    return loss_fn


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs CUDA"))])
def test_resume_equals_an_uninterrupted_run(tmp_path, device):
    # 20 samples, batch 8: two batches an epoch, so the run crosses epochs and the
    # checkpoint at step 3 falls inside one; noisy_mse needs the RNG state restored.
    config = {"steps": 7, "warmup_steps": 2, "ema_decay": 0.99, "checkpoint_every": 3,
              "seed": 3, "device": device}
    whole = train(mlp(), noisy_mse, regression_data(),
                  quiet(out_dir=str(tmp_path / "a"), **config))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint-0000006", "checkpoint-0000007"]  # keep_checkpoints=2

    interrupted = quiet(out_dir=str(tmp_path / "b"), **config)
    with pytest.raises(Crash):
        train(mlp(), crash_after(5), regression_data(), interrupted)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000003"
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train(mlp(), noisy_mse, regression_data(), interrupted)

    resumed_config = quiet(out_dir=str(tmp_path / "b"), resume=True, **config)
    resumed = train(mlp(seed=99), noisy_mse, regression_data(), resumed_config)
    assert resumed.step == 7
    assert resumed.history == whole.history
    assert_equal_weights(weights(resumed.model), weights(whole.model))
    assert_equal_weights(weights(resumed.ema_model), weights(whole.ema_model))
    assert_equal_weights(load_file(resumed.checkpoint / "model.safetensors"),
                         load_file(whole.checkpoint / "model.safetensors"))

    with pytest.warns(UserWarning, match="changed lr, seed"):
        train(mlp(), noisy_mse, regression_data(),
              quiet(out_dir=str(tmp_path / "b"), resume=True, **{**config, "steps": 8,
                                                                  "lr": 0.1, "seed": 4}))

    wider = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match=r"checkpoint-0000008 does not fit this model"):
        train(wider, noisy_mse, regression_data(), resumed_config)


# Distributed data parallel: two processes under torchrun, gloo, CPU


def three_steps_then_resume_to_four(model: nn.Module, out_dir: str):
    """Train 3 steps with checkpoints, then resume to 4 steps in a fresh model."""
    first = train(model, mse, regression_data(),
                  quiet(steps=3, lr=0.05, out_dir=out_dir, checkpoint_every=1))
    history = dict(first.history)  # `first.model` is trained further below
    resumed = train(mlp(seed=7), mse, regression_data(),
                    quiet(steps=4, lr=0.05, out_dir=out_dir, resume=True))
    return weights(first.model), history, weights(resumed.model)


def ddp_case(out: str) -> None:
    """Run in each torchrun process with a different initial model per rank (DDP must
    broadcast rank 0's); each rank's weights and history saved."""
    rank = init_distributed().rank
    after_3, history, after_4 = three_steps_then_resume_to_four(mlp(seed=100 + rank),
                                                                f"{out}/checkpoints")
    save_file(after_3, f"{out}/rank{rank}.safetensors")
    save_file(after_4, f"{out}/resumed{rank}.safetensors")
    torch.save(history, f"{out}/history{rank}.pt")


def test_ddp_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp_case.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      f"from test_training_loop import ddp_case\nddp_case({str(tmp_path)!r})\n")
    torchrun(str(script))
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert_equal_weights(rank0, rank1)  # identical across ranks, bit for bit
    assert_equal_weights(load_file(tmp_path / "resumed0.safetensors"),
                         load_file(tmp_path / "resumed1.safetensors"))

    # One process on the same global batches of 8 (each rank had 4 of them), rank 0's
    # initial weights: the same steps up to float rounding.
    after_3, history, after_4 = three_steps_then_resume_to_four(mlp(seed=100),
                                                                str(tmp_path / "single"))
    assert not torch.equal(rank0["0.weight"], mlp(seed=100)[0].weight)  # it did train
    assert_equal_weights(rank0, after_3, atol=1e-6)
    assert_equal_weights(load_file(tmp_path / "resumed0.safetensors"), after_4, atol=1e-6)
    ddp_history = torch.load(tmp_path / "history0.pt", weights_only=True)
    assert ddp_history["loss"] == pytest.approx(history["loss"], abs=1e-6)

    # Only rank 0 wrote checkpoints, one set, matching the single-process ones.
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-0000003", "checkpoint-0000004"]
    for name in names:
        assert_equal_weights(load_file(tmp_path / "checkpoints" / name / "model.safetensors"),
                             load_file(tmp_path / "single" / name / "model.safetensors"),
                             atol=1e-6)

    with pytest.warns(UserWarning, match="written by 2 processes, not 1"):
        train(mlp(), mse, regression_data(),
              quiet(steps=5, lr=0.05, out_dir=str(tmp_path / "checkpoints"), resume=True))


def test_global_batch_is_split_between_ranks():
    """What makes N processes equal one: rank r's share of each batch of the permutation."""
    data = regression_data()
    shares = [list(DistributedSampler(data, 2, r, seed=5, drop_last=True)) for r in (0, 1)]
    order = torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()
    for b in range(2):
        assert sorted(shares[0][b * 4:(b + 1) * 4] + shares[1][b * 4:(b + 1) * 4]) == \
            sorted(order[b * 8:(b + 1) * 8])
