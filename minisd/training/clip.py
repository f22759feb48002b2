"""Training the bundled CLIP on the shapes world, and measuring what it learned.

`python -m minisd.training clip` does, in order (every setting a field of `CLIPTrainConfig`, and a
command-line option of the same name):

1. learns a BPE vocabulary from the captions of the train split (`learn_bpe`: 155 merges,
   after which every word of the world is one token) — the tokenizer of the bundled model;
2. builds a small `CLIPModel` (text tower of width 128 with 3 layers, which later conditions
   the U-Net; a convolutional image tower) and trains it with the shared loop
   (`minisd.training.loop.train`) on (picture, caption) pairs with CLIP's symmetric InfoNCE loss,
   1,000 steps of 128 pairs, a quarter of the pictures shown in grey (`contrastive_loss`);
3. saves ``tokenizer/``, ``text_encoder/`` and ``clip_image/`` into the model folder `output`
   and prints the evaluation below.

Captions are tokenised to 77 ids, as SD does, then cut to the longest caption of the batch
(`TokenizeCollate`): the text tower is causal and the loss reads the end-of-text position,
so the padding after it changes neither the loss nor any gradient — the cut only saves
the ~4× of compute that 77 positions would cost.

Under torchrun each process holds a share of the batch, but InfoNCE compares every caption
with every picture of the *global* batch: `contrastive_loss` gathers the unit vectors of all
processes with an autograd-aware all_gather, so every process computes the same full loss;
the gather's backward sums the processes' gradients and DDP's averaging divides by their
number, which leaves exactly the one-process gradient.

Evaluation on test pictures of one object (`zero_shot_accuracy`): for each picture, captions
that differ only in one attribute (the six colours, the three shapes or the nine positions,
everything else as in the picture) are ranked by similarity — CLIP's zero-shot classifier
(Radford et al. 2021, §3.1.2), with the embeddings of three caption templates averaged
(prompt ensembling, §3.1.4). `retrieval` measures text→image recall@1 among test pairs.
"""

import functools
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from minisd.clip_contrastive import CLIPConfig, CLIPImageConfig, CLIPModel, clip_loss
from minisd.shapes.world import (
    ALL_PAIRS,
    COLOURS,
    INVERSE,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    ShapesDataset,
    binding_swaps,
    describe,
    sample_scene,
)
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import CLIPTokenizer, learn_bpe
from minisd.training.loop import TrainConfig, init_distributed, train


@dataclass
class CLIPTrainConfig(TrainConfig):
    """Everything that decides the bundled CLIP's training: the loop's settings
    (`TrainConfig`, with this recipe's defaults) and the recipe's own, each also a
    command-line option.

    Raises ValueError naming the field for a value out of range.
    """

    # the loop's settings, with this recipe's defaults (their help is TrainConfig's)
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    out_dir: str | None = "runs/clip"
    name: str = "clip"
    # the recipe's own
    output: str | None = field(default="runs/minisd-shapes", metadata={
        "help": "model folder to write tokenizer/, text_encoder/ and clip_image/ into "
                "('none': do not save)"})
    vocab_captions: int = field(default=20_000, metadata={
        "help": "train captions the BPE vocabulary is learned from"})
    hidden_size: int = field(default=128, metadata={
        "help": "width of the text tower (the U-Net's cross_attention_dim)"})
    num_hidden_layers: int = field(default=3, metadata={"help": "layers of the text tower"})
    num_attention_heads: int = field(default=4, metadata={
        "help": "attention heads of the text tower"})
    projection_dim: int = field(default=64, metadata={
        "help": "width of the joint text–image space"})
    grayscale_p: float = field(default=0.25, metadata={
        "help": "probability of showing a training picture in grey"})
    hard_negatives: bool = field(default=True, metadata={
        "help": "score each picture also against a caption it contradicts (its own words "
                "with the binding, relation, colour, shape or position changed)"})
    eval_images: int = field(default=1000, metadata={
        "help": "one-object test pictures for the zero-shot accuracies (0: no evaluation)"})

    def __post_init__(self):
        super().__post_init__()
        need = self._need
        for name in ("vocab_captions", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "projection_dim"):
            need(getattr(self, name) >= 1, name, "at least 1")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             "a divisor of hidden_size")
        need(0 <= self.grayscale_p <= 1, "grayscale_p", "in [0, 1]")
        need(self.eval_images >= 0, "eval_images", "non-negative")


def caption_corpus(num_captions: int = 20_000, seed: int = 0) -> list[str]:
    """The captions of the first `num_captions` samples of the train split (no held-out
    colour–shape pair among them, as in the rest of training)."""
    data = ShapesDataset("train", num_samples=num_captions, seed=seed)
    return [data.prompt(i).caption for i in range(num_captions)]


def learn_tokenizer(num_captions: int = 20_000, seed: int = 0) -> CLIPTokenizer:
    """A CLIPTokenizer whose merges are learned from `caption_corpus` (min frequency 2)."""
    return CLIPTokenizer.from_merges(learn_bpe(caption_corpus(num_captions, seed)))


def small_clip_config(tokenizer: CLIPTokenizer, hidden_size: int, num_hidden_layers: int,
                      num_attention_heads: int, projection_dim: int,
                      image_config: CLIPImageConfig | None = None) -> CLIPConfig:
    """A small CLIP's configuration for a learned vocabulary (the bundled one: the defaults of
    `CLIPTrainConfig`): a text tower of `hidden_size` (the U-Net's cross_attention_dim) with
    an MLP of 4× that, 77 positions, quick_gelu as in SD v1; `image_config` (default: the
    default image tower)."""
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                          intermediate_size=4 * hidden_size, projection_dim=projection_dim,
                          num_hidden_layers=num_hidden_layers,
                          num_attention_heads=num_attention_heads, max_position_embeddings=77,
                          pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    return CLIPConfig(text, image_config or CLIPImageConfig(), projection_dim=projection_dim)


def tokenize_cropped(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Ids (B, L ≤ 77): the captions tokenised to 77, cut after the last column that holds
    a caption's end-of-text. The pooled text vectors equal those of all 77 columns (the
    tower is causal; see the module docstring)."""
    ids = tokenizer(captions)                                          # (B, 77)
    ends = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    return ids[:, :int(ends.max()) + 1]


class WithNegatives(Dataset):
    """The shapes world's (picture, caption) pairs with a third item: a caption the picture
    contradicts (`ShapesDataset.negative_prompt`), for `contrastive_loss`'s hard negatives."""

    def __init__(self, dataset: ShapesDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        return *self.dataset[i], self.dataset.negative_prompt(i).caption


class TokenizeCollate:
    """DataLoader collate: [(picture, caption, …)] → (pictures (B, 3, 64, 64), ids (B, L), …)
    with `tokenize_cropped` ids for every caption column (one length for all). Picklable, so
    DataLoader workers can use it."""

    def __init__(self, tokenizer: CLIPTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples):
        pictures, *columns = default_collate(samples)
        ids = tokenize_cropped(self.tokenizer, [c for column in columns for c in column])
        return pictures, *ids.split(len(pictures))


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows of x, in rank order, with gradients flowing back to each one's
    own rows (torch.distributed.nn); x itself outside torchrun."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x))


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights of R, G, B (as Pillow's "L" mode)


def grayscale(pictures: torch.Tensor) -> torch.Tensor:
    """Pictures (B, 3, H, W) in [−1, 1] → their luma Y = 0.299 R + 0.587 G + 0.114 B,
    repeated on the three channels: (B, 3, H, W) in [−1, 1]."""
    weights = pictures.new_tensor(LUMA).view(1, 3, 1, 1)
    return (pictures * weights).sum(dim=1, keepdim=True).expand_as(pictures)


def contrastive_loss(model: CLIPModel, batch, grayscale_p: float = 0.0) -> dict[str, torch.Tensor]:
    """`train`'s loss_fn: clip_loss over the global batch (features gathered across
    processes). batch = (pictures (b, 3, 64, 64), ids (b, L)) of this process, or
    (pictures, ids, negative ids (b, L)) with a hard negative caption per picture.

    With hard negatives each picture's row of the picture → caption cross-entropy gets one
    more column, the similarity to its own contradicting caption (Yuksekgonul et al. 2023,
    §5, "NegCLIP"): the loss falls only if the text tower tells "a red circle left of a blue
    square" from its swapped forms, which a bag of words cannot. The caption → picture
    direction is unchanged.

    With `grayscale_p` > 0 each picture is shown in grey with that probability, its caption
    unchanged (random grayscale, as in SimCLR, Chen et al. 2020, App. A): to match such a
    picture the image tower must read shapes without their colour, which lets it recognise
    a shape in a colour it never saw it in (the held-out pairs). Draws from torch's global
    generator only when grayscale_p > 0.

    Returns {'loss', 'logit_scale' (exp t, the inverse temperature), 'accuracy' (share of
    captions whose own picture scores highest in the batch)}."""
    pictures, ids, *negative_ids = batch
    if grayscale_p > 0:
        grey = torch.rand(len(pictures), device=pictures.device) < grayscale_p
        pictures = torch.where(grey.view(-1, 1, 1, 1), grayscale(pictures), pictures)
    image_embeds = _gather(F.normalize(model.get_image_features(pictures), dim=-1))
    text_embeds = _gather(F.normalize(model.get_text_features(ids), dim=-1))
    logits = model.similarity_logits(text_embeds, image_embeds)   # (B, B), global batch
    labels = torch.arange(len(logits), device=logits.device)
    terms = {"accuracy": (logits.argmax(dim=1) == labels).float().mean()}
    if not negative_ids:
        loss = clip_loss(logits)
    else:
        negatives = _gather(F.normalize(model.get_text_features(negative_ids[0]), dim=-1))
        own_negative = model.similarity_logits(negatives, image_embeds).diagonal()  # (B,)
        per_picture = torch.cat([logits.T, own_negative[:, None]], dim=1)          # (B, B + 1)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(per_picture, labels)) / 2
        terms["negative_wins"] = (own_negative >= logits.diagonal()).float().mean()
    return {"loss": loss, "logit_scale": model.logit_scale.exp().detach(), **terms}


# ---- evaluation ----

TEMPLATES = {  # three of the world's caption templates each, with first synonyms
    "colour": ("{colour} {shape}", "a picture of a {colour} {shape}",
               "a {size} {colour} {shape} {where}"),
    "shape": ("{colour} {shape}", "a picture of a {colour} {shape}",
              "a {size} {colour} {shape} {where}"),
    "position": ("a {size} {colour} {shape} {where}", "{where} there is a {colour} {shape}",
                 "{colour} {shape}, {pos}, {bg} background"),
}
CANDIDATES = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}


def caption_for(template: str, obj: SceneObject, background: str) -> str:
    """Fill a caption template as the world does (data.describe), with first synonyms:
    ("a {size} {colour} {shape} {where}", small orange circle at left) → "a small orange
    circle on the left"."""
    preposition = ("on the" if obj.position in ("left", "right") else
                   "at the" if obj.position in ("top", "bottom") else "in the")
    text = template.format(colour=obj.colour, shape=obj.shape, size=obj.size, bg=background,
                           pos=obj.position, where=f"{preposition} {obj.position}")
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def single_object_indices(dataset: ShapesDataset, n: int) -> list[int]:
    """The first `n` indices of `dataset` whose picture holds one object."""
    found = [i for i in range(len(dataset)) if len(dataset.attributes(i).objects) == 1][:n]
    if len(found) < n:
        raise ValueError(f"the dataset has only {len(found)} one-object pictures, not {n}")
    return found


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, captions: list[str],
                    batch_size: int = 512) -> torch.Tensor:
    """Unit text vectors (N, P) of `captions`, in batches."""
    device = next(model.parameters()).device
    return torch.cat([F.normalize(model.get_text_features(
        tokenize_cropped(tokenizer, captions[i:i + batch_size]).to(device)), dim=-1)
        for i in range(0, len(captions), batch_size)])


@torch.no_grad()
def image_embeddings(model: CLIPModel, pictures: torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
    """Unit image vectors (N, P) of pictures (N, 3, 64, 64) in [−1, 1], in batches."""
    device = next(model.parameters()).device
    return torch.cat([F.normalize(model.get_image_features(
        pictures[i:i + batch_size].to(device)), dim=-1)
        for i in range(0, len(pictures), batch_size)])


@torch.no_grad()
def zero_shot_predictions(model: CLIPModel, tokenizer: CLIPTokenizer,
                          scenes: list[Scene], pictures: torch.Tensor,
                          attribute: str) -> list[str]:
    """For each one-object picture (N, 3, 64, 64) with its `Scene`, the value of `attribute`
    ("colour", "shape" or "position") whose captions — the picture's own attributes with
    only that one changed, `TEMPLATES` averaged — are most similar to the picture.
    Raises ValueError for another attribute or a scene with two objects."""
    if attribute not in TEMPLATES:
        raise ValueError(f"unknown attribute {attribute!r}; use one of {', '.join(TEMPLATES)}")
    if any(len(s.objects) != 1 for s in scenes):
        raise ValueError("zero-shot classification takes one-object scenes only")
    values, templates = CANDIDATES[attribute], TEMPLATES[attribute]
    captions = [caption_for(t, SceneObject(**{**vars(s.objects[0]), attribute: v}),
                            s.background)
                for s in scenes for v in values for t in templates]
    text = text_embeddings(model, tokenizer, captions)
    text = F.normalize(text.view(len(scenes), len(values), len(templates), -1).mean(2), dim=-1)
    images = image_embeddings(model, pictures)                        # (N, P)
    best = torch.einsum("np,nvp->nv", images, text).argmax(dim=1)
    return [values[i] for i in best.tolist()]


def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, dataset: ShapesDataset,
                       indices: list[int]) -> dict[str, float]:
    """Zero-shot accuracy per attribute (colour, shape, position) on the one-object
    pictures `indices` of `dataset`; when some but not all of them hold a held-out
    colour–shape pair, also separately for the pairs seen in training ('<attribute> seen
    pairs') and the held-out ones ('<attribute> held out')."""
    scenes = [dataset.attributes(i) for i in indices]
    pictures = torch.stack([dataset[i][0] for i in indices])
    held = torch.tensor([s.held_out for s in scenes])
    result = {}
    for attribute in TEMPLATES:
        predicted = zero_shot_predictions(model, tokenizer, scenes, pictures, attribute)
        right = torch.tensor([p == getattr(s.objects[0], attribute)
                              for p, s in zip(predicted, scenes)], dtype=torch.float)
        result[attribute] = right.mean().item()
        if held.any() and not held.all():
            result[f"{attribute} seen pairs"] = right[~held].mean().item()
            result[f"{attribute} held out"] = right[held].mean().item()
    return result


def shows(scene: Scene, stated: Scene) -> bool:
    """True if picture `scene` shows everything the prompt attributes `stated` say
    (None = not said), reading a two-object relation either way round."""
    if len(scene.objects) != len(stated.objects) or stated.background not in (
            None, scene.background):
        return False
    readings = [(scene.objects, scene.relation)]
    if scene.relation is not None:
        readings.append((scene.objects[::-1], INVERSE[scene.relation]))
    return any(relation == stated.relation and all(
        s.shape == o.shape and s.colour == o.colour and s.size in (None, o.size)
        and s.position in (None, o.position) for s, o in zip(stated.objects, objects))
        for objects, relation in readings)


def retrieval(model: CLIPModel, tokenizer: CLIPTokenizer, dataset: ShapesDataset,
              n: int = 100) -> dict[str, float]:
    """Text→image retrieval among the first `n` (picture, caption) pairs of `dataset`:
    'R@1' the share of captions whose own picture ranks first, 'R@5' within the first five,
    'R@1 consistent' the share whose first picture shows everything the caption says (a
    caption such as "a picture of a red circle" fits several pictures equally well)."""
    pictures = torch.stack([dataset[i][0] for i in range(n)])
    prompts = [dataset.prompt(i) for i in range(n)]
    similarity = text_embeddings(model, tokenizer, [p.caption for p in prompts]) \
        @ image_embeddings(model, pictures).T                          # (n texts, n images)
    ranked = similarity.argsort(dim=1, descending=True)
    own = torch.arange(n)[:, None]
    first = ranked[:, 0].tolist()
    return {"R@1": (ranked[:, :1] == own).any(1).float().mean().item(),
            "R@5": (ranked[:, :5] == own).any(1).float().mean().item(),
            "R@1 consistent": sum(shows(dataset.attributes(j), p.attributes)
                                  for j, p in zip(first, prompts)) / n}


def evaluate_clip(model: CLIPModel, tokenizer: CLIPTokenizer, num_images: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """Zero-shot accuracies on the first `num_images` one-object test pictures and
    retrieval among the first 100 test pairs: the model card's figures."""
    test = ShapesDataset("test", num_samples=max(4 * num_images, 100), seed=seed)
    model.eval()
    return {**zero_shot_accuracy(model, tokenizer, test, single_object_indices(test, num_images)),
            **retrieval(model, tokenizer, test, 100)}


@torch.no_grad()
def binding_similarity(text_model: CLIPTextModel, tokenizer: CLIPTokenizer,
                       num_scenes: int = 300, seed: int = 0) -> dict[str, dict[str, float]]:
    """How much of a bag of words the text tower is: for `num_scenes` two-object scenes (all
    colour–shape pairs) captioned as the world does, the mean cosine similarity between the
    caption and the same words bound another way (`binding_swaps`: relation reversed,
    colours swapped, shapes swapped), read at the pooled end-of-text vector ("pooled") and
    over the whole context the U-Net reads ("context", the (77, D) last hidden state
    flattened); "unrelated" pairs two different scenes, for scale. A bag of words scores
    1.0 on every swap. Returns {kind: {"pooled": cos, "context": cos}}."""
    captions = {kind: [] for kind in ("caption", "relation", "colours", "shapes")}
    for i in range(num_scenes):
        rng = random.Random(f"binding/{seed}/{i}")
        scene, _ = sample_scene(rng, ALL_PAIRS, two_objects=True)
        state = rng.getstate()
        for kind, version in {"caption": scene, **binding_swaps(scene)}.items():
            rng.setstate(state)   # the same template and words for every version
            captions[kind].append(describe(version, rng).caption)
    text_model.eval()
    vectors = {}  # kind → {"pooled": (N, D), "context": (N, 77·D)}
    for kind, texts in captions.items():
        out = text_model(tokenizer(texts))
        vectors[kind] = {"pooled": out.pooler_output, "context": out.last_hidden_state.flatten(1)}
    half = num_scenes // 2
    pairs = {kind: (vectors["caption"], vectors[kind]) for kind in ("relation", "colours", "shapes")}
    pairs["unrelated"] = ({k: v[:half] for k, v in vectors["caption"].items()},
                          {k: v[half:2 * half] for k, v in vectors["caption"].items()})
    return {kind: {read: F.cosine_similarity(a[read], b[read]).mean().item()
                   for read in ("pooled", "context")} for kind, (a, b) in pairs.items()}


# ---- the recipe ----

@dataclass
class CLIPTrainResult:
    """What `train_clip` returns on rank 0: the trained model (CPU, eval mode), its learned
    tokenizer, the loop's per-step history and the minutes it took."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    history: dict[str, list[float]]
    minutes: float


def train_clip(config: CLIPTrainConfig) -> CLIPTrainResult | None:
    """Learn the vocabulary, train the model and save it into `config.output` (module
    docstring). Writes nothing to stdout (`run` prints and evaluates).

    Returns a CLIPTrainResult on rank 0; None on the other ranks of a torchrun run.
    Raises ValueError as `train` does."""
    start = time.perf_counter()
    tokenizer = learn_tokenizer(config.vocab_captions, config.seed)
    torch.manual_seed(config.seed)
    model = CLIPModel(small_clip_config(tokenizer, config.hidden_size, config.num_hidden_layers,
                                        config.num_attention_heads, config.projection_dim))
    loss_fn = functools.partial(contrastive_loss, grayscale_p=config.grayscale_p)
    data = ShapesDataset("train", seed=config.seed)
    result = train(model, loss_fn, WithNegatives(data) if config.hard_negatives else data, config,
                   collate_fn=TokenizeCollate(tokenizer))
    if init_distributed().rank != 0:
        return None
    model = result.model.cpu().eval()
    if config.output is not None:
        tokenizer.save_pretrained(Path(config.output) / "tokenizer")
        model.save_pretrained(config.output)
    return CLIPTrainResult(model, tokenizer, result.history,
                           (time.perf_counter() - start) / 60)


def run(config: CLIPTrainConfig) -> CLIPTrainResult | None:
    """`python -m minisd.training clip`: `train_clip`, then (rank 0) print a summary and the
    evaluation (`evaluate_clip` on `eval_images` pictures)."""
    result = train_clip(config)
    if result is None:
        return None
    last = result.history["loss"][-100:]
    saved = f"; saved to {config.output}" if config.output is not None else ""
    print(f"clip: {len(result.history['loss'])} steps in {result.minutes:.1f} min; vocabulary "
          f"{result.tokenizer.vocab_size} tokens ({len(result.tokenizer.merges)} merges); mean "
          f"loss of the last {len(last)} steps {sum(last) / len(last):.4f}{saved}")
    if config.eval_images:
        for name, value in evaluate_clip(result.model, result.tokenizer, config.eval_images,
                                         config.seed).items():
            print(f"  {name:<20} {value:.3f}")
    return result
