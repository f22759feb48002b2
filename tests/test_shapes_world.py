"""The shapes world (minisd.shapes.world): determinism, captions that tell the truth, the held-out
split, the DataLoader contract and clear errors for bad names."""

import random
import re

import pytest
import torch
from torch.utils.data import DataLoader

from minisd.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    ONE_OBJECT_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    TWO_OBJECT_TEMPLATES,
    Scene,
    SceneObject,
    ShapesDataset,
    binding_swaps,
    cell_centre,
    describe,
    evaluation_prompts,
    render,
    showcase_prompts,
)


def test_same_seed_gives_identical_bytes():
    a, b = ShapesDataset("train", seed=3), ShapesDataset("train", seed=3)
    for i in (0, 1, 17, 99_999):
        (image_a, caption_a), (image_b, caption_b) = a[i], b[i]
        assert image_a.numpy().tobytes() == image_b.numpy().tobytes()
        assert caption_a == caption_b and a.attributes(i) == b.attributes(i)


def test_other_seed_or_split_gives_other_samples():
    base = ShapesDataset("train", seed=0)
    others = ShapesDataset("train", seed=1), ShapesDataset("test", seed=0)
    for other in others:
        same = sum(torch.equal(base[i][0], other[i][0]) and base[i][1] == other[i][1]
                   for i in range(20))
        assert same <= 2


def test_sample_layout_and_range():
    image, caption = ShapesDataset("test")[5]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and isinstance(caption, str)


def test_render_draws_the_scene_where_it_says():
    scene = Scene((SceneObject("square", "red", "large", "top left"),), "white")
    image = render(scene)
    red = torch.tensor(COLOURS["red"]) / 127.5 - 1
    white = torch.tensor(BACKGROUNDS["white"]) / 127.5 - 1
    covered = (image - red[:, None, None]).abs().amax(0) < 1e-6
    # The 18 px box centred on (64/6, 64/6) = (10.67, 10.67) spans x, y in [1.67, 19.67):
    # pixels 2..18 are fully red, pixels 1 and 19 partly (anti-aliased).
    assert covered[2:19, 2:19].all() and covered.sum() == 17 * 17
    torch.testing.assert_close(image[:, 40, 40], white)
    edge = image[:, 10, 1]
    assert not torch.allclose(edge, red) and not torch.allclose(edge, white)


def test_cell_centres():
    assert cell_centre("top left") == pytest.approx((64 / 6, 64 / 6))
    assert cell_centre("center") == pytest.approx((32.0, 32.0))
    assert cell_centre("bottom") == pytest.approx((32.0, 64 * 5 / 6))


def test_dataloader_with_workers_matches_indexing():
    ds = ShapesDataset("train", num_samples=16, seed=5)
    batches = list(DataLoader(ds, batch_size=8, num_workers=2))
    assert len(batches) == 2
    images, captions = batches[1]
    assert images.shape == (8, 3, 64, 64) and len(captions) == 8
    for k in range(8):
        assert torch.equal(images[k], ds[8 + k][0]) and captions[k] == ds[8 + k][1]


def _words(kind, value):
    return SYNONYMS[kind][value]


def _says(caption, words):
    return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", caption) for w in words)


def test_captions_state_their_attributes_truthfully():
    ds = ShapesDataset("train", two_object_fraction=0.5, seed=2)
    for i in range(600):
        full, prompt = ds.attributes(i), ds.prompt(i)
        stated = prompt.attributes
        assert len(stated.objects) == len(full.objects)
        for o, s in zip(full.objects, stated.objects):
            assert (s.shape, s.colour) == (o.shape, o.colour)
            assert _says(prompt.caption, _words("shape", o.shape))
            assert _says(prompt.caption, _words("colour", o.colour))
            for name in ("size", "position"):
                if getattr(s, name) is not None:
                    assert getattr(s, name) == getattr(o, name)
                    assert _says(prompt.caption, _words(name, getattr(o, name)))
        if stated.background is not None:
            assert stated.background == full.background
            assert _says(prompt.caption, _words("background", full.background))
        if len(full.objects) == 2:
            assert stated.relation == full.relation
            assert _says(prompt.caption, _words("relation", full.relation))


def test_two_object_relation_is_true_in_the_layout():
    ds = ShapesDataset("train", two_object_fraction=1.0, seed=4)
    for i in range(300):
        scene = ds.attributes(i)
        (xa, ya), (xb, yb) = (cell_centre(o.position) for o in scene.objects)
        expected = {"left of": (xa < xb and ya == yb), "right of": (xa > xb and ya == yb),
                    "above": (ya < yb and xa == xb), "below": (ya > yb and xa == xb)}
        assert expected[scene.relation], (scene, ds.prompt(i).caption)
        a, b = scene.objects
        assert a.colour != b.colour and a.shape != b.shape


def test_every_template_and_value_is_used():
    ds = ShapesDataset("train", two_object_fraction=0.5, seed=0)
    scenes = [ds.attributes(i) for i in range(1500)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert len(ONE_OBJECT_TEMPLATES) + len(TWO_OBJECT_TEMPLATES) >= 10
    captions = {ds.prompt(i).caption for i in range(300)}
    assert len(captions) > 250  # varied, not a handful of fixed sentences


def test_article_agrees_with_the_next_word():
    rng = random.Random(0)
    scene = Scene((SceneObject("circle", "orange", "large", "center"),
                   SceneObject("square", "blue", "small", "right")), "black", "left of")
    captions = [describe(scene, rng).caption for _ in range(50)]
    assert any("an orange" in c for c in captions)
    assert not any(re.search(r"\ba [aeiou]", c) for c in captions)


def test_held_out_pairs_never_in_train():
    ds = ShapesDataset("train", two_object_fraction=0.5, seed=0)
    forms = [f"{c} {s}" for colour, shape in HELD_OUT for c in _words("colour", colour)
             for s in _words("shape", shape)]
    forms += [f"{s}, {c}" for colour, shape in HELD_OUT for c in _words("colour", colour)
              for s in _words("shape", shape)]
    forms += [f"{s} coloured {c}" for colour, shape in HELD_OUT
              for c in _words("colour", colour) for s in _words("shape", shape)]
    for i in range(3000):
        scene, caption = ds.attributes(i), ds.prompt(i).caption
        assert not scene.held_out, scene
        assert not any(form in caption for form in forms), caption


def test_held_out_pairs_in_test_split():
    ds = ShapesDataset("test", seed=0)
    pairs = set()
    for i in range(1, 200, 2):
        scene = ds.attributes(i)
        assert scene.held_out and ds.prompt(i).held_out
        pairs |= {(o.colour, o.shape) for o in scene.objects} & set(HELD_OUT)
    assert pairs == set(HELD_OUT)
    prompts = evaluation_prompts(40)
    assert len(prompts) == 40 and sum(p.held_out for p in prompts) >= 20
    assert prompts[7] == ds.prompt(7)


@pytest.mark.parametrize("make, known", [
    (lambda: SceneObject("hexagon", "red"), "circle, square, triangle"),
    (lambda: SceneObject("circle", "pink"), "red, orange, yellow, green, blue, purple"),
    (lambda: SceneObject("circle", "red", "medium"), "small, large"),
    (lambda: SceneObject("circle", "red", "small", "middle"), "top left, top, top right"),
    (lambda: Scene((SceneObject("circle", "red"),), "blue"), "white, gray, black"),
    (lambda: Scene((SceneObject("circle", "red"), SceneObject("square", "blue")), None,
                   "behind"), "left of, right of, above, below"),
    (lambda: ShapesDataset("validation"), "train, test"),
    (lambda: cell_centre("upper"), "top left"),
])
def test_unknown_names_list_the_known_ones(make, known):
    with pytest.raises(ValueError, match=re.escape(known)):
        make()


def test_bad_scenes_and_indices():
    red_circle = SceneObject("circle", "red", "small", "left")
    with pytest.raises(ValueError, match="one or two objects"):
        Scene((red_circle,) * 3, "white")
    with pytest.raises(ValueError, match="same colour and shape"):
        Scene((red_circle, red_circle), "white", "left of")
    with pytest.raises(ValueError, match="needs two objects"):
        Scene((red_circle,), "white", "above")
    with pytest.raises(ValueError, match="render needs"):
        render(Scene((SceneObject("circle", "red"),), "white"))
    with pytest.raises(ValueError, match="two_object_fraction"):
        ShapesDataset("train", two_object_fraction=1.5)
    with pytest.raises(IndexError):
        ShapesDataset("test", num_samples=10)[10]


def test_scene_dict_round_trip():
    scene = ShapesDataset("test", seed=0).attributes(3)
    assert Scene.from_dict(scene.to_dict()) == scene


def test_negative_prompt_changes_one_stated_attribute():
    ds = ShapesDataset("train", 400, two_object_fraction=0.5, seed=0)
    kinds = set()
    for i in range(400):
        scene, prompt, negative = ds.attributes(i), ds.prompt(i), ds.negative_prompt(i)
        assert negative.caption != prompt.caption
        assert not negative.held_out                       # train captions name no held-out pair
        assert negative == ds.negative_prompt(i)           # reproducible
        stated, false = prompt.attributes, negative.attributes
        if len(scene.objects) == 2:
            # one binding changed: the relation reversed, or two values swapped between objects
            if false.relation != stated.relation:
                kinds.add("relation")
                assert false.objects == stated.objects
            elif false.objects[0].colour != stated.objects[0].colour:
                kinds.add("colours")
                assert [o.colour for o in false.objects] == [o.colour for o in stated.objects][::-1]
            else:
                kinds.add("shapes")
                assert [o.shape for o in false.objects] == [o.shape for o in stated.objects][::-1]
        else:
            (s,), (f,) = stated.objects, false.objects
            changed = [a for a in ("colour", "shape", "position") if getattr(s, a) != getattr(f, a)]
            assert len(changed) == 1 and (changed != ["position"] or s.position is not None)
            kinds.add(changed[0])
    assert kinds == {"relation", "colours", "shapes", "colour", "shape", "position"}


def test_binding_swaps_written_out():
    red_circle = SceneObject("circle", "red", "small", "left")
    blue_square = SceneObject("square", "blue", "large", "right")
    swaps = binding_swaps(Scene((red_circle, blue_square), "white", "left of"))
    assert swaps["relation"] == Scene((red_circle, blue_square), "white", "right of")
    assert swaps["colours"] == Scene((SceneObject("circle", "blue", "small", "left"),
                                      SceneObject("square", "red", "large", "right")),
                                     "white", "left of")
    assert swaps["shapes"] == Scene((SceneObject("square", "red", "small", "left"),
                                     SceneObject("circle", "blue", "large", "right")),
                                    "white", "left of")
    with pytest.raises(ValueError, match="two objects"):
        binding_swaps(Scene((red_circle,), "white"))


def test_showcase_prompts_say_what_their_attributes_say():
    prompts = showcase_prompts()
    assert len(prompts) == 16 and sum(p.held_out for p in prompts) == 3
    assert sum(len(p.attributes.objects) == 2 for p in prompts) == 5
    assert {p.attributes.background for p in prompts} >= {"black", "white", "gray"}
    world_words = {word for i in range(3000)
                   for word in re.findall(r"[a-z]+", ShapesDataset("train", 3000).prompt(i).caption)}
    for prompt in prompts:
        words = re.findall(r"[a-z]+", prompt.caption)
        assert set(words) <= world_words, prompt.caption
        for o in prompt.attributes.objects:
            assert o.colour in words and o.shape in words, prompt.caption
        scene = prompt.attributes
        if scene.relation is not None:
            assert scene.relation.split()[0] in words
        if scene.background is not None:
            assert scene.background in words
