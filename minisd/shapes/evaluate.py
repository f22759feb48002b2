"""Prompt adherence: does a picture of the shapes world show what its prompt says?

GenEval (Ghosh et al. 2023) scores text-to-image models by detecting the objects in a
generated picture and checking each stated attribute. minisd's world is simple enough to
do the reading with no learned model, by image analysis alone (`read`):

1. Background: the median colour of the border pixels. If fewer than 60% of them lie
   near it, the picture has no plain background and nothing is read from it.
2. Objects: pixels far from the background, grouped into 8-connected components; those of
   at least MIN_AREA pixels are objects, largest first.
3. Each object: its colour is the named colour nearest to the median of its most saturated
   pixels. A coverage α ∈ [0, 1] per pixel (how far from the background towards that
   colour, over the component and 2 px around it) gives a soft width, height, area and
   centre of mass. Shape: a triangle's centre of mass lies 1/6 of its height below its
   box centre, a circle's and a square's on it; a square fills its box, a circle π/4 of
   it (a triangle 1/2, but a blurred one up to ~0.75, so fill alone cannot tell it from a
   circle). Size compares the box side with the midpoint of SIZES; position is the grid
   cell of the box centre; two objects' relation is the dominant axis of their
   displacement.

`score` compares one reading with a prompt's attributes; `evaluate` generates pictures for
many prompts and reports accuracy per attribute, for two-object binding (both colour–shape
pairs and the relation right) and separately for prompts with a held-out pair.
Command line: `python -m minisd.shapes.evaluate --dataset` measures the judge on real samples;
`python -m minisd.shapes.evaluate --model data/minisd-shapes` judges a model's pictures for the 200
test prompts (`evaluate_model`), the table of the bundled model's card.
"""

import argparse
import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from minisd.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SIZES,
    Prompt,
    Scene,
    ShapesDataset,
)

FOREGROUND_DISTANCE = 35.0  # RGB distance from the background that makes a pixel an object's
UNIFORM_DISTANCE = 40.0  # border pixels this near the median count as plain background
UNIFORM_SHARE = 0.6  # … and at least this share of them must be: else no plain background
MIN_AREA = 12  # pixels; smaller components are specks, not objects
MAX_OBJECTS = 6  # only the largest components are matched with a prompt's objects
BACKGROUND_MAX_DISTANCE = 80.0  # further from every named background: background unknown
COLOUR_MAX_DISTANCE = 100.0  # further from every named colour: colour unknown
TRIANGLE_OFFSET = 0.06  # centre of mass this far (in heights) off the box centre: a triangle
SQUARE_FILL = 0.87  # a symmetric shape filling this much of its box: a square, else a circle
FILL_RANGE = (0.4, 1.05)  # no shape of the world fills less of its box
ASPECT_RANGE = (0.67, 1.5)  # every shape of the world has a square box
SIZE_THRESHOLD = sum(SIZES.values()) / 2  # px: box side below → small
SIZE_RANGE = (4.0, 28.0)  # box sides outside this are no size of the world
ATTRIBUTES = ("count", "colour", "shape", "size", "position", "background", "relation",
              "binding", "overall")


@dataclass(frozen=True)
class Detection:
    """One object read from a picture. Names are None where the reading matches none.

    `x`, `y`: box centre in pixels of the 64×64 picture; `width`, `height`, `area`: soft
    (coverage-weighted) pixels; `fill` = area/(width·height); `offset`: distance of the
    centre of mass from the box centre, in heights.
    """

    shape: str | None
    colour: str | None
    size: str | None
    position: str | None
    x: float
    y: float
    width: float
    height: float
    area: float
    fill: float
    offset: float


@dataclass(frozen=True)
class Reading:
    """What `read` found: the background's name (None: none plain, or no named one) and
    the objects, largest first."""

    background: str | None
    objects: tuple[Detection, ...]


def to_pixels(image) -> np.ndarray:
    """A picture as float32 RGB pixels (64, 64, 3) in [0, 255].

    Accepts a tensor (3, H, W) in [−1, 1], a PIL image, or a uint8 array (H, W, 3); other
    sizes are resized to 64×64 (box filter).

    Raises:
        ValueError for a tensor or array of another layout.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor (3, H, W) in [-1, 1], got shape "
                             f"{tuple(image.shape)}")
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
        image = array.round().to(torch.uint8).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array (H, W, 3), got {image.dtype} "
                             f"{image.shape}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _nearest(rgb: np.ndarray, named: dict, max_distance: float) -> str | None:
    name, distance = min(((n, float(np.linalg.norm(rgb - c))) for n, c in named.items()),
                         key=lambda t: t[1])
    return name if distance <= max_distance else None


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean mask (H, W) → int labels (H, W), 0 outside.

    Every pixel starts with its own number; repeated 3×3 max-pooling within the mask
    spreads each component's largest number over the whole component."""
    m = torch.from_numpy(mask).float()[None, None]
    labels = torch.arange(1, mask.size + 1, dtype=torch.float32).reshape(m.shape) * m
    while True:
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(spread, labels):
            return labels[0, 0].long().numpy()
        labels = spread


def _classify_shape(width: float, height: float, fill: float, offset: float) -> str | None:
    """Triangle if the centre of mass is off the box centre; else square or circle by fill.
    The offset tells a blurred triangle from a circle, which its fill alone does not."""
    if not (ASPECT_RANGE[0] <= width / height <= ASPECT_RANGE[1]
            and FILL_RANGE[0] <= fill <= FILL_RANGE[1]):
        return None
    if offset >= TRIANGLE_OFFSET:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    m = torch.from_numpy(mask).float()[None, None]
    return F.max_pool2d(m, 2 * pixels + 1, stride=1, padding=pixels)[0, 0].bool().numpy()


def _read_object(pixels: np.ndarray, region: np.ndarray, others: np.ndarray,
                 distance: np.ndarray, background: np.ndarray) -> Detection:
    """Measure the object on `region` (H, W) bool of `pixels` (H, W, 3); `others` marks
    the other objects' pixels."""
    core = pixels[region & (distance >= 0.75 * distance[region].max())]
    rgb = np.median(core, axis=0)
    direction = rgb - background
    around = _dilate(region, 2) & ~others  # the object and its soft (blurred) edge
    alpha = np.zeros(region.shape, np.float32)
    coverage = (pixels[around] - background) @ direction / (direction @ direction)
    alpha[around] = np.clip((coverage - 0.1) / 0.8, 0, 1)  # symmetric about 1/2: drops noise
    columns, rows = alpha.max(axis=0), alpha.max(axis=1)  # coverage profiles along x and y
    width, height, area = float(columns.sum()), float(rows.sum()), float(alpha.sum())
    centres = np.arange(IMAGE_SIZE) + 0.5
    x, y = float(columns @ centres / width), float(rows @ centres / height)
    mass_x, mass_y = float(alpha.sum(0) @ centres / area), float(alpha.sum(1) @ centres / area)
    fill, offset = area / (width * height), math.hypot(mass_x - x, mass_y - y) / height
    side = max(width, height)
    size = (None if not SIZE_RANGE[0] <= side <= SIZE_RANGE[1] else
            "small" if side < SIZE_THRESHOLD else "large")
    cell = IMAGE_SIZE / 3
    col, row = min(int(x // cell), 2), min(int(y // cell), 2)
    return Detection(_classify_shape(width, height, fill, offset),
                     _nearest(rgb, COLOURS, COLOUR_MAX_DISTANCE), size,
                     POSITIONS[3 * row + col], x, y, width, height, area, fill, offset)


def read(image) -> Reading:
    """Read the background and the objects of a picture (see the module docstring).

    Args:
        image: tensor (3, H, W) in [−1, 1], PIL image or uint8 array (H, W, 3).
    Returns:
        Reading; no objects when the border is not a plain colour (noise) or nothing
        stands out from it (a flat picture).
    """
    pixels = to_pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - background, axis=1) <= UNIFORM_DISTANCE) < UNIFORM_SHARE:
        return Reading(None, ())
    distance = np.linalg.norm(pixels - background, axis=2)
    labels = _components(distance > FOREGROUND_DISTANCE)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    largest = [i for _, i in sorted(zip(-areas, ids)) if areas[ids == i][0] >= MIN_AREA]
    objects = tuple(_read_object(pixels, labels == i, (labels > 0) & (labels != i), distance,
                                 background) for i in largest[:MAX_OBJECTS])
    return Reading(_nearest(background, BACKGROUNDS, BACKGROUND_MAX_DISTANCE), objects)


def relation(a: Detection, b: Detection) -> str | None:
    """Where a is relative to b: "left of", "right of", "above", "below" by the larger of
    the horizontal and vertical distances between their centres (None if they coincide)."""
    dx, dy = a.x - b.x, a.y - b.y
    if max(abs(dx), abs(dy)) < 1.0:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _match(wanted, found) -> list:
    """Assign detections to the prompt's objects (each at most once, None if missing),
    maximising the number of right colours and shapes, then preferring larger objects."""
    def key(choice):
        right = sum((found[j].colour == o.colour) + (found[j].shape == o.shape)
                    for o, j in zip(wanted, choice) if j is not None)
        return right, sum(j is not None for j in choice), -sum(j or 0 for j in choice)
    options = itertools.product([None, *range(len(found))], repeat=len(wanted))
    valid = [c for c in options if len([j for j in c if j is not None]) ==
             len({j for j in c if j is not None})]
    return [None if j is None else found[j] for j in max(valid, key=key)]


def _as_scene(attributes) -> Scene:
    if isinstance(attributes, Prompt):
        return attributes.attributes
    if isinstance(attributes, dict):
        return Scene.from_dict(attributes)
    if isinstance(attributes, Scene):
        return attributes
    raise TypeError(f"attributes must be a Scene, Prompt or dict, got {type(attributes)}")


def score(image, attributes) -> dict[str, bool]:
    """Which of a prompt's stated attributes a picture shows.

    Args:
        image: tensor (3, H, W) in [−1, 1], PIL image or uint8 array (H, W, 3).
        attributes: Scene (None = not stated), Prompt, or a dict as `Scene.to_dict` writes.
    Returns:
        {"count": the number of objects is right, "colour", "shape", and where stated
        "size", "position", "background", "relation": right for every object (after
        matching detections to the prompt's objects), for two objects "binding": both
        colour–shape pairs and the relation right, "overall": all of these right}.
    Raises:
        ValueError for unknown attribute names (listing the known ones) or a bad image.
    """
    scene = _as_scene(attributes)
    reading = read(image)
    found = reading.objects
    matched = _match(scene.objects, found)
    result = {"count": len(found) == len(scene.objects)}
    for name in ("colour", "shape", "size", "position"):
        stated = [(o, d) for o, d in zip(scene.objects, matched) if getattr(o, name) is not None]
        if stated:
            result[name] = all(d is not None and getattr(d, name) == getattr(o, name)
                               for o, d in stated)
    if scene.background is not None:
        result["background"] = reading.background == scene.background
    if scene.relation is not None:
        result["relation"] = None not in matched and relation(*matched) == scene.relation
        result["binding"] = result["relation"] and all(
            d.colour == o.colour and d.shape == o.shape for o, d in zip(scene.objects, matched))
    result["overall"] = all(result.values())
    return result


def summarise(scores: list[dict[str, bool]], held_out: list[bool]) -> dict:
    """Accuracies from per-prompt scores: {"all" | "seen" | "held_out": {attribute:
    accuracy}, "n": {group: {attribute: number of prompts that stated it}}}."""
    results = {"all": {}, "seen": {}, "held_out": {}, "n": {"all": {}, "seen": {}, "held_out": {}}}
    for group, keep in (("all", lambda h: True), ("seen", lambda h: not h),
                        ("held_out", lambda h: h)):
        for name in ATTRIBUTES:
            values = [s[name] for s, h in zip(scores, held_out) if keep(h) and name in s]
            if values:
                results[group][name] = sum(values) / len(values)
                results["n"][group][name] = len(values)
    return results


def format_table(results: dict) -> str:
    """The accuracies of `summarise` as a text table, one row per attribute."""
    groups = ("all", "seen", "held_out")
    lines = [f"{'attribute':<11}" + "".join(f"{g.replace('_', '-'):>18}" for g in groups)]
    for name in ATTRIBUTES:
        if name not in results["all"]:
            continue
        cells = [f"{results[g][name]:.4f} ({results['n'][g][name]})" if name in results[g]
                 else "–" for g in groups]
        lines.append(f"{name:<11}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def evaluate(generate_fn, prompts: list[Prompt], batch_size: int = 32, progress: bool = True,
             print_table: bool = True) -> dict:
    """Generate a picture for every prompt and judge it.

    Args:
        generate_fn: list of B captions → B pictures: a tensor (B, 3, H, W) in [−1, 1] or
            a list of anything `score` takes.
        prompts: Prompt objects, e.g. `minisd.shapes.world.evaluation_prompts()`.
        batch_size: captions per call of `generate_fn`.
        progress: a tqdm bar over batches; False writes nothing but the table.
        print_table: print `format_table` of the result.
    Returns:
        the dict of `summarise`, plus "scores": one `score` dict per prompt.
    Raises:
        ValueError if `generate_fn` returns another number of pictures than captions.
    """
    scores = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="evaluate", disable=not progress):
        batch = prompts[start:start + batch_size]
        images = generate_fn([p.caption for p in batch])
        if len(images) != len(batch):
            raise ValueError(f"generate_fn returned {len(images)} pictures for {len(batch)} "
                             "captions")
        scores += [score(image, p) for image, p in zip(images, batch)]
    results = summarise(scores, [p.held_out for p in prompts])
    if print_table:
        print(format_table(results))
    return {**results, "scores": scores}


def judge_dataset(split: str = "test", num_samples: int = 2000, seed: int = 0,
                  progress: bool = True) -> dict:
    """The judge's accuracy on real samples of the world, scoring every attribute of each
    (full attributes, not only what the caption says). Returns the dict of `summarise`."""
    ds = ShapesDataset(split, num_samples, seed)
    scores, held_out = [], []
    for i in tqdm(range(num_samples), desc="judge", disable=not progress):
        scene = ds.attributes(i)
        scores.append(score(ds[i][0], scene))
        held_out.append(scene.held_out)
    return summarise(scores, held_out)


def pipeline_generate_fn(pipe, num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, seed: int = 0,
                         scheduler: str | None = None):
    """A `generate_fn` for `evaluate` from a `minisd.pipeline.StableDiffusionPipeline`: the
    k-th caption it is given (counting over calls) gets the noise of seed `seed + k`, so a
    picture does not depend on the batch size. Steps and guidance default to the model's own
    (`pipe.sampling_defaults`). Returns tensors (B, 3, H, W) in [−1, 1]."""
    done = 0

    def generate(captions: list[str]) -> torch.Tensor:
        nonlocal done
        generators = [torch.Generator().manual_seed(seed + done + i) for i in range(len(captions))]
        done += len(captions)
        images = pipe(captions, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generators, scheduler=scheduler,
                      output_type="pt", progress=False).images
        return images * 2 - 1
    return generate


def evaluate_model(model=None, num_prompts: int = 200, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, seed: int = 0,
                   scheduler: str | None = None, prompt_seed: int = 0, batch_size: int = 50,
                   device=None, progress: bool = True, print_table: bool = True) -> dict:
    """Judge a text-to-image model on `minisd.shapes.world.evaluation_prompts(num_prompts,
    prompt_seed)`: the bundled model by default, or a model folder (anything
    `StableDiffusionPipeline.from_pretrained` loads). Pictures at the U-Net's native size,
    `num_inference_steps` of the folder's scheduler (or `scheduler`, a name) with
    classifier-free guidance `guidance_scale` (both by default the model's own sampling
    defaults, from its model_index.json), prompt k with seed `seed + k`.
    Returns the dict of `evaluate`."""
    from minisd.pipeline import StableDiffusionPipeline
    from minisd.shapes.world import evaluation_prompts

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32,
                                                   device=device)
    generate = pipeline_generate_fn(pipe, num_inference_steps, guidance_scale, seed, scheduler)
    return evaluate(generate, evaluation_prompts(num_prompts, prompt_seed), batch_size,
                    progress, print_table)


def main(argv=None):
    """`python -m minisd.shapes.evaluate --dataset [--split test] [--num-samples 2000] [--seed 0]
    [--json PATH]` measures the judge on real samples; `python -m minisd.shapes.evaluate --model
    data/minisd-shapes [--num-prompts 200] [--steps N] [--guidance S] [--scheduler NAME]
    [--seed 0] [--json PATH]` judges a model's pictures for the test prompts."""
    parser = argparse.ArgumentParser(prog="python -m minisd.shapes.evaluate", description=(
        "Prompt adherence on the shapes world, judged by image analysis."))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", action="store_true",
                        help="judge real samples of the world (measures the judge itself)")
    source.add_argument("--model", help="judge the pictures of this model folder (e.g. "
                                        "data/minisd-shapes) for the test prompts")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0,
                        help="--dataset: the world's seed; --model: the seed of the first "
                             "prompt's noise (prompt k uses seed + k)")
    parser.add_argument("--num-prompts", type=int, default=200, help="--model: test prompts")
    parser.add_argument("--steps", type=int, default=None,
                        help="--model: denoising steps (default: the model's own)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="--model: classifier-free guidance scale (default: the model's own)")
    parser.add_argument("--scheduler", default=None,
                        help="--model: ddim, euler, dpmpp_2m, … (default: the model's own)")
    parser.add_argument("--device", default=None, help="--model: cpu, cuda, mps (default: best)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.model is not None:
        print(f"{args.model}: {args.num_prompts} test prompts, {args.steps or 'the model’s'} "
              f"steps, guidance {args.guidance or 'of the model'}, scheduler "
              f"{args.scheduler or 'of the model'}, seed {args.seed}")
        results = evaluate_model(args.model, args.num_prompts, args.steps, args.guidance,
                                 args.seed, args.scheduler, device=args.device)
    else:
        results = judge_dataset(args.split, args.num_samples, args.seed)
        print(f"judge on {args.num_samples} real {args.split} samples (seed {args.seed}):")
        print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
