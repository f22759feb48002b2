"""The prompt-adherence judge (minisd.shapes.evaluate): measurements on drawn shapes, accuracy on
real samples, failure on pictures without objects, and the evaluate/CLI contract."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minisd.shapes.evaluate import (
    _components,
    evaluate,
    format_table,
    judge_dataset,
    main,
    read,
    relation,
    score,
    to_pixels,
)
from minisd.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    Prompt,
    Scene,
    SceneObject,
    ShapesDataset,
    evaluation_prompts,
    render,
)

OBJECT_ATTRIBUTES = ("count", "colour", "shape", "size", "position", "relation", "binding")


def _scene(*objects, background="white", relation=None):
    return Scene(tuple(SceneObject(*o) for o in objects), background, relation)


@pytest.mark.parametrize("shape, fill, offset", [
    ("square", 1.0, 0.0), ("circle", math.pi / 4, 0.0), ("triangle", 0.5, 1 / 6)])
def test_measurements_of_a_large_shape(shape, fill, offset):
    found = read(render(_scene((shape, "blue", "large", "center"), background="gray")))
    (d,) = found.objects
    assert (d.shape, d.colour, d.size, d.position) == (shape, "blue", "large", "center")
    assert found.background == "gray"
    assert d.width == pytest.approx(18, abs=0.6) and d.height == pytest.approx(18, abs=0.6)
    assert d.x == pytest.approx(32, abs=0.3) and d.y == pytest.approx(32, abs=0.6)
    assert d.fill == pytest.approx(fill, abs=0.07) and d.offset == pytest.approx(offset, abs=0.03)


def test_components_exact():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one 8-connected component
    mask[4:6, 3:6] = True
    mask[0, 5] = True
    labels = _components(mask)
    assert len(np.unique(labels[mask])) == 3
    assert labels[0, 0] == labels[1, 1] and (labels[~mask] == 0).all()
    assert len(np.unique(labels[4:6, 3:6])) == 1


def test_relation_of_two_detections():
    found = read(render(_scene(("circle", "red", "small", "left"),
                               ("square", "green", "large", "right"))))
    circle, square = sorted(found.objects, key=lambda d: d.x)
    assert relation(circle, square) == "left of" and relation(square, circle) == "right of"
    found = read(render(_scene(("circle", "red", "small", "top"),
                               ("square", "green", "large", "bottom"))))
    square, circle = found.objects  # largest first
    assert relation(circle, square) == "above" and relation(square, circle) == "below"


def test_judge_reads_real_samples():
    results = judge_dataset("test", num_samples=300, seed=7, progress=False)
    for name in ("count", "colour", "shape", "size", "position", "background", "relation",
                 "binding", "overall"):
        assert results["all"][name] >= 0.98, (name, results["all"])
    assert results["n"]["held_out"]["overall"] >= 150


def test_judge_on_blurred_noisy_samples():
    """Generated pictures are softer than rendered ones: halve the resolution, upsample,
    add noise of std 0.04; the judge still reads nearly everything."""
    ds, g = ShapesDataset("test", seed=8), torch.Generator().manual_seed(0)
    right = 0
    for i in range(100):
        soft = F.interpolate(F.avg_pool2d(ds[i][0][None], 2), size=64, mode="bilinear")[0]
        noisy = (soft + 0.04 * torch.randn(soft.shape, generator=g)).clamp(-1, 1)
        right += score(noisy, ds.attributes(i))["overall"]
    assert right >= 95


def test_captions_agree_with_the_judge():
    ds = ShapesDataset("train", seed=9, two_object_fraction=0.5)
    agree = sum(score(ds[i][0], ds.prompt(i))["overall"] for i in range(200))
    assert agree >= 198


def test_judge_sees_wrong_pictures():
    red_circle_left = _scene(("circle", "red", "small", "left"))
    blue_square_left = render(_scene(("square", "blue", "small", "left")))
    s = score(blue_square_left, red_circle_left)
    assert s["count"] and s["size"] and s["position"] and s["background"]
    assert not s["colour"] and not s["shape"] and not s["overall"]
    moved = score(render(_scene(("circle", "red", "large", "top right"))), red_circle_left)
    assert moved["colour"] and moved["shape"] and not moved["size"] and not moved["position"]
    prompt = _scene(("circle", "red"), ("square", "blue"), background=None,
                    relation="left of")
    swapped = render(_scene(("circle", "blue", "large", "left"),
                            ("square", "red", "large", "right")))
    s = score(swapped, prompt)
    assert s["count"] and not s["binding"] and not s["overall"]
    mirrored = render(_scene(("circle", "red", "large", "right"),
                             ("square", "blue", "large", "left")))
    s = score(mirrored, prompt)
    assert s["colour"] and s["shape"] and not s["relation"] and not s["binding"]
    right = render(_scene(("circle", "red", "large", "left"), ("square", "blue", "small", "right"),
                          background="black"))
    assert score(right, prompt) == {"count": True, "colour": True, "shape": True,
                                    "relation": True, "binding": True, "overall": True}
    extra = score(right, _scene(("circle", "red", "large")))
    assert extra["colour"] and extra["shape"] and not extra["count"] and not extra["overall"]


def test_noise_fails_every_attribute():
    g = torch.Generator().manual_seed(0)
    prompts = evaluation_prompts(20, seed=3)
    for k, p in enumerate(prompts):
        noise = (torch.rand(3, 64, 64, generator=g) * 2 - 1 if k % 2 else
                 torch.randn(3, 64, 64, generator=g).clamp(-1, 1))
        s = score(noise, ShapesDataset("test", seed=3).attributes(k))
        assert not any(s.values()), s
        assert not any(score(noise, p).values())


@pytest.mark.parametrize("name, rgb", [*COLOURS.items(), *BACKGROUNDS.items()])
def test_flat_pictures_fail(name, rgb):
    flat = Image.new("RGB", (64, 64), rgb)
    ds = ShapesDataset("test", seed=4, two_object_fraction=0.5)
    for i in range(12):
        scene = ds.attributes(i)
        s = score(flat, scene)
        assert not any(s[k] for k in OBJECT_ATTRIBUTES if k in s) and not s["overall"]
        # The one thing a flat picture can show is its background.
        assert s["background"] == (name == scene.background)


def test_evaluate_with_real_pictures_and_failures(capsys):
    prompts = evaluation_prompts(24, seed=5, two_object_fraction=0.5)
    ds = ShapesDataset("test", seed=5, two_object_fraction=0.5)
    pictures = iter(ds[i][0] for i in range(len(prompts)))
    results = evaluate(lambda captions: torch.stack([next(pictures) for _ in captions]),
                       prompts, batch_size=5, progress=False)
    table = capsys.readouterr().out
    assert table.strip() == format_table(results) and "held-out" in table
    assert results["all"]["overall"] == 1.0 and results["held_out"]["binding"] == 1.0
    assert results["n"]["all"]["overall"] == 24
    assert len(results["scores"]) == 24
    def grey(captions):
        return [Image.new("RGB", (512, 512), (128, 128, 128))] * len(captions)

    results = evaluate(grey, prompts, progress=False, print_table=False)
    assert capsys.readouterr().out == ""
    assert results["all"]["overall"] == 0.0 and results["all"]["colour"] == 0.0
    with pytest.raises(ValueError, match="returned 1 pictures for 3 captions"):
        evaluate(lambda c: [grey(c)[0]], prompts[:3], progress=False, print_table=False)


def test_bad_inputs():
    image = render(_scene(("circle", "red", "small", "left")))
    with pytest.raises(ValueError, match=re.escape("circle, square, triangle")):
        score(image, {"objects": [{"shape": "star", "colour": "red"}]})
    with pytest.raises(ValueError, match=re.escape("red, orange, yellow, green, blue, purple")):
        score(image, {"objects": [{"shape": "circle", "colour": "pink"}]})
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        score(image[0], _scene(("circle", "red")))
    with pytest.raises(ValueError, match=r"uint8 array \(H, W, 3\)"):
        to_pixels(np.zeros((64, 64), np.float32))
    with pytest.raises(TypeError, match="Scene, Prompt or dict"):
        score(image, "a red circle")


def test_inputs_of_other_kinds_and_sizes():
    scene = _scene(("triangle", "orange", "large", "bottom right"), background="black")
    image = render(scene)
    array = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    big = Image.fromarray(array).resize((512, 512), Image.Resampling.NEAREST)
    for picture in (image, array, Image.fromarray(array), big):
        assert score(picture, scene)["overall"]
    assert score(image, Prompt("an orange triangle", scene))["overall"]


def test_command_line(capsys):
    results = main(["--dataset", "--num-samples", "30", "--seed", "2"])
    out = capsys.readouterr().out
    assert "judge on 30 real test samples" in out and "overall" in out
    assert results["n"]["all"]["overall"] == 30
    with pytest.raises(SystemExit):
        main([])
