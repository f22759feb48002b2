"""Checks that a figure reads well in a notebook (`from figures import readable`)."""

import matplotlib.pyplot as plt
from matplotlib.text import Text

from minisd import viz


def _drawn_texts(fig) -> list[Text]:
    """The texts of `fig` that are drawn: every visible Text except the tick labels of an
    axis turned off or that lie outside their axis's view (matplotlib keeps those, undrawn)."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            margin = 1e-9 * abs(high - low)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not (ax.axison and axis.get_visible()) \
                        or not low - margin <= tick.get_loc() <= high + margin:
                    hidden.update({tick.label1, tick.label2})
    return [t for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t not in hidden]


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts of `fig` (titles, labels, tick labels) whose boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a.overlaps(box_b)]


def readable(fig) -> None:
    """The figure is shown at its own size in JupyterLab and no two texts collide."""
    assert fig.get_figwidth() <= viz.MAX_WIDTH + 1e-9
    assert overlapping_texts(fig) == []
    plt.close(fig)
