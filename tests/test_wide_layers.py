"""Ghost layouts: every map takes as many ghosts as its place in the module holds (a partial last run when s
does not divide n), and layers wider than ``fit.WIDE`` choose within runs of channels (whole groups of s), merged
into one valid layout; exact ghosts stay exact either way, and the report says when runs were used."""

import pytest
import torch
from torch import nn

import ghostify
from ghostify.init.fit import WIDE, blocks


def capacities(n: int, s: int) -> list:
    """Ghosts each intrinsic position keeps in a module of ``n`` outputs: slot ``k * m + i`` (ghost ``k`` of map
    ``i``) is kept when it is among the first ``n - m``."""
    m = -(-n // s)
    return [sum(k * m + i < n - m for k in range(s - 1)) for i in range(m)]


@pytest.mark.parametrize("n, s", [(WIDE, 2), (WIDE + 1, 2), (2 * WIDE, 2), (3712, 2), (WIDE + 6, 3), (4097, 4),
                                  (5000, 5)])
def test_runs_split_the_layer_into_whole_groups(n, s):
    spans = blocks(n, s)
    assert spans[0].start == 0 and spans[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert all((span.stop - span.start) % s == 0 for span in spans[:-1])
    assert max(span.stop - span.start for span in spans) <= WIDE + s
    assert (len(spans) == 1) == (n <= WIDE)
    # the runs' capacities laid side by side are the layer's: every kept ghost slot has one channel
    assert sum(sum(capacities(span.stop - span.start, s)) for span in spans) == sum(capacities(n, s))


@pytest.mark.parametrize("n, s", [(401, 2), (403, 4), (WIDE + 177, 2), (WIDE + 8, 3)])
def test_exact_ghosts_of_a_wide_layer_stay_exact(n, s):
    """Channels come in groups of scaled copies of one filter, as many as each intrinsic position of the run
    holds (the last positions of a layer whose n is not a multiple of s hold fewer), shuffled within their run:
    with the right choice a 1x1 Ghost module reproduces the conv exactly."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([1 + cap for span in blocks(n, s) for cap in capacities(span.stop - span.start, s)])
    base = torch.randn(len(sizes), 64, generator=g)
    weight = base.repeat_interleave(sizes, 0) * (0.5 + torch.rand(n, 1, generator=g))
    order = torch.cat([span.start + torch.randperm(span.stop - span.start, generator=g) for span in blocks(n, s)])
    conv = nn.Conv2d(64, n, 1, bias=False)
    conv.weight.data.copy_(weight[order].view(n, 64, 1, 1))
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 64, 6, 6, generator=g)
    ghost = ghostify.convert(model, s=s, d=1, include_stem=True, example_inputs=x[:1]).eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(ghost(x), expected, atol=1e-4 * expected.abs().max())
    if n <= WIDE:
        assert "wide layers" not in ghost.ghostify_result.notes
        return
    assert "1 layers wider than" in ghost.ghostify_result.notes["wide layers"]
    text = ghostify.report(model, ghost, (x[:1],)).renderable(120)
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(text)
    assert "wide layers: 1 layers wider than" in console.export_text()
