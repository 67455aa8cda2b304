"""Where a decode step's CUDA graph is cut (encdec_cli/engine/cuda_graphs.py): the GPU starts after
the first layer's launch, and each later segment is launched while the layers before it run. The
graphs themselves: tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import pytest

from encdec_cli.engine.cuda_graphs import SEGMENTS, segment_cuts


@pytest.mark.parametrize(
    "layers, cuts",
    [(32, [1, 3, 7, 15]), (24, [1, 3, 7, 15]), (12, [1, 3, 7]), (6, [1, 3]), (4, [1, 3]), (2, [1]), (1, [])],
)
def test_one_layer_first_then_each_segment_twice_the_layers_before(layers, cuts):
    assert segment_cuts(layers) == cuts
    bounds = [0, *cuts, layers]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sizes[0] == 1 and min(sizes) >= 1 and len(sizes) <= SEGMENTS
    # every segment but the last is as long as all the layers before it, plus one
    assert all(size == bounds[i] + 1 for i, size in enumerate(sizes[:-1]))


def test_fewer_segments_when_asked():
    """A pipeline stage's graphs are one segment each; two segments cut after the first layer."""
    assert segment_cuts(32, 1) == []
    assert segment_cuts(32, 2) == [1]
