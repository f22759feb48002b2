"""The benchmarks keep working: every script runs with --tiny in a subprocess (all at once,
one thread each) and writes the JSON it promises; gpu.py refuses without CUDA; the shared
timing helper alternates, takes medians and refuses fewer than 3 runs. Nothing here times
anything: the figures themselves are only checked for shape and consistency."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import timing  # benchmarks/ is a folder of scripts, not a package

SCRIPTS = {"unet": "bench_unet.py", "vae": "bench_vae.py", "clip": "bench_clip.py",
           "pipeline": "bench_pipeline.py", "course": "bench_course.py", "gpu": "gpu.py"}
SCHEDULERS = ["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every script with --tiny at once; name → (Popen, JSON path)."""
    folder = tmp_path_factory.mktemp("benchmarks")
    started = {}
    for name, script in SCRIPTS.items():
        out = folder / f"{name}.json"
        command = [sys.executable, str(BENCHMARKS / script), "--tiny", "--threads", "1",
                   "--runs", "3", "--warmup", "1", "--out", str(out)]
        started[name] = subprocess.Popen(command, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True), out
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def finished(runs, name) -> tuple[dict, str]:
    """Wait for a script; check it succeeded; return its JSON and its printed output."""
    process, out = runs[name]
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"{SCRIPTS[name]} failed:\n{stdout}\n{stderr}"
    assert f"written to {out}" in stdout
    return json.loads(out.read_text()), stdout


def check_timing(result: dict, runs: int = 3):
    """One `timing.compare` result: positive seconds, medians within min–max, the ratio."""
    for side in ("minisd", "reference"):
        s = result[side]
        assert len(s["runs"]) == runs and all(t > 0 for t in s["runs"])
        assert s["min"] <= s["median"] <= s["max"]
        assert s["median"] == statistics.median(s["runs"])
    assert result["ratio"] == pytest.approx(result["minisd"]["median"]
                                            / result["reference"]["median"])
    assert result["load_before"] >= 0 and result["load_after"] >= 0


def check_environment(data: dict):
    assert data["threads"] == 1 and data["torch"] == torch.__version__
    assert data["diffusers"] and data["transformers"] and data["date"]


@pytest.mark.parametrize("name, sizes", [("unet", [8, 16]), ("vae", [8, 16])])
def test_unet_and_vae_benchmarks(runs, name, sizes):
    data, stdout = finished(runs, name)
    check_environment(data)
    assert data["config"] == "tiny" and data["dtype"] == "float32"
    assert [r["latent"][-1] for r in data["results"]] == sizes
    for result in data["results"]:
        check_timing(result)
        assert result["relative_error"] < 1e-5        # same weights, same maths
        assert result["case"] in stdout                 # the table is printed


def test_clip_benchmark(runs):
    data, stdout = finished(runs, "clip")
    check_environment(data)
    (result,) = data["results"]
    assert result["input_ids"] == [2, 77] and result["relative_error"] < 1e-5
    check_timing(result)
    assert "encode 2x77 ids" in stdout


def test_pipeline_benchmark(runs):
    data, stdout = finished(runs, "pipeline")
    check_environment(data)
    assert data["steps"] == 2 and data["picture"] == [64, 64] and data["guidance_scale"] == 7.5
    assert [r["scheduler"] for r in data["results"]] == SCHEDULERS
    for result in data["results"]:
        check_timing(result)
        assert result["relative_error"] < 1e-4
        assert result["case"] in stdout


def test_course_benchmark(runs):
    data, stdout = finished(runs, "course")
    assert data["pytest_status"] == 0 and data["pytest_summary"].startswith("1 passed")
    assert list(data["notebooks"]) == ["tiny.ipynb"]
    assert 0 < data["notebooks"]["tiny.ipynb"] < data["seconds"]
    assert "tiny.ipynb" in stdout


def test_gpu_benchmark_tiny(runs):
    data, stdout = finished(runs, "gpu")
    check_environment(data)
    assert data["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else "cpu")
    assert data["pipeline_steps"] == 3 and data["picture"] == [64, 64]
    assert list(data["results"]) == ["unet", "vae_decode", "text_encoder", "pipeline"]
    for result in data["results"].values():
        check_timing(result)
        assert result["relative_error"] < 1e-5
    assert stdout.rstrip().splitlines()[-1].startswith("pipeline, 3 steps")  # table last


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_benchmark_refuses_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    process = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--out", str(out)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 2
    assert "needs an NVIDIA GPU with CUDA" in process.stderr and "--tiny" in process.stderr
    assert not out.exists()


def test_compare_alternates_and_takes_medians():
    calls = []
    result = timing.compare(lambda: calls.append("ours"), lambda: calls.append("ref"),
                            runs=4, warmup=2)
    assert calls == ["ours", "ref"] * 2 + ["ours", "ref", "ref", "ours"] * 2
    check_timing(result, runs=4)


def test_compare_needs_three_runs():
    with pytest.raises(ValueError, match="at least 3 runs"):
        timing.compare(lambda: None, lambda: None, runs=2)
    with pytest.raises(SystemExit):
        timing.parse(timing.parser("x", "x"), ["--runs", "2"])


def test_summary_and_relative_error():
    assert timing.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0,
                                               "runs": [3.0, 1.0, 2.0]}
    assert timing.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) \
        == pytest.approx(4 / 3)


def test_table_lines_up_columns():
    text = timing.table([{"a": "x", "b": 0.123456}, {"a": "longer", "b": 12.0}],
                        [("a", "name"), ("b", "value")])
    assert text.splitlines() == ["name    value",
                                 "------  -----",
                                 "x       0.123",
                                 "longer     12"]
