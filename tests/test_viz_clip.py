"""The chapter-3 draw functions of minisd.viz, without widgets."""

import pytest
import torch
import torch.nn.functional as F
from figures import readable

from minisd import viz
from minisd.clip_contrastive import CLIPModel
from minisd.shapes.world import ShapesDataset
from minisd.tokenizer import CLIPTokenizer, learn_bpe
from minisd.training.clip import small_clip_config


@pytest.fixture(scope="module")
def parts():
    data = ShapesDataset("test", 8)
    tokenizer = CLIPTokenizer.from_merges(learn_bpe(data.prompt(i).caption for i in range(8)))
    torch.manual_seed(0)
    model = CLIPModel(small_clip_config(tokenizer, 32, 1, 2, 16)).eval()
    pictures = torch.stack([data[i][0] for i in range(8)])
    with torch.no_grad():
        embeds = F.normalize(model.get_image_features(pictures), dim=-1)
    return tokenizer, model, pictures, embeds


def test_draw_prompt_matches_shows_the_best_pictures_and_the_tokens(parts):
    tokenizer, model, pictures, embeds = parts
    # make picture 5 the best match of the prompt's own text vector
    with torch.no_grad():
        text = F.normalize(model.get_text_features(tokenizer("red zebra")), dim=-1)[0]
    embeds = embeds.clone()
    embeds[5] = text
    fig = viz.draw_prompt_matches("red zebra", tokenizer, model, pictures, embeds, k=3)
    axes = fig.axes
    assert len(axes) == 3
    assert axes[0].get_title() == "#5: 1.00"
    scores = [float(ax.get_title().split(": ")[1]) for ax in axes]
    assert scores == sorted(scores, reverse=True)
    title = fig._suptitle.get_text()
    assert title.startswith(f"{len(tokenizer.encode('red zebra'))} tokens + BOS/EOS, padded "
                            "to 77:")
    assert "red_:" in title and "z:" in title      # an unseen word: byte pieces
    readable(fig)
    readable(viz.draw_prompt_matches("red zebra", tokenizer, model, pictures, embeds, k=8))
    with pytest.raises(ValueError, match="k=9; choose 1…8"):
        viz.draw_prompt_matches("red", tokenizer, model, pictures, embeds, k=9)
    with pytest.raises(ValueError, match="8 pictures but 7 image vectors"):
        viz.draw_prompt_matches("red", tokenizer, model, pictures, embeds[:7])


def test_draw_similarity_outlines_each_rows_best(parts):
    _, _, pictures, _ = parts
    similarity = torch.tensor([[1.0, 9.0, 2.0], [8.0, 0.0, 1.0]])
    fig = viz.draw_similarity(similarity, pictures[:3], ["first caption", "second"])
    heat = fig.axes[1]
    outlined = sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in heat.patches)
    assert outlined == [(0.0, 1.0), (1.0, 0.0)]          # (column, row) of each row's maximum
    assert [t.get_text() for t in heat.get_yticklabels()] == ["first caption", "second"]
    assert len(heat.texts) == 6
    readable(fig)
    readable(viz.draw_similarity(torch.rand(8, 8), pictures, [f"caption {i}" for i in range(8)]))
    with pytest.raises(ValueError, match=r"expected \(2 captions, 2 pictures\)"):
        viz.draw_similarity(similarity, pictures[:2], ["a", "b"])
