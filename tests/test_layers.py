"""Layer names: listing by kind and resolving with suggestions."""

from __future__ import annotations

import pytest

import vizcnn
from vizcnn.layers import resolve_layer


def test_list_layers_by_kind(alexnet, resnet18):
    assert vizcnn.list_layers(alexnet, "conv") == [f"features.{i}" for i in (0, 3, 6, 8, 10)]
    assert vizcnn.list_layers(alexnet, "pool") == ["features.2", "features.5", "features.12",
                                                   "avgpool"]
    assert vizcnn.list_layers(alexnet, "linear") == ["classifier.1", "classifier.4",
                                                     "classifier.6"]
    assert vizcnn.list_layers(alexnet, "relu")[0] == "features.1"
    everything = vizcnn.list_layers(resnet18)
    assert "layer1.0" in everything and "layer1.0.conv1" in everything and "" not in everything
    leaves = vizcnn.list_layers(resnet18, "leaf")
    assert "layer1.0" not in leaves and "layer1.0.conv1" in leaves
    assert len(vizcnn.list_layers(resnet18, "conv")) == 20  # 17 convs + 3 downsample convs


def test_unknown_layer_names_the_nearest(alexnet):
    with pytest.raises(vizcnn.LayerNotFound) as caught:
        resolve_layer(alexnet, "features.11x")
    message = str(caught.value)
    assert "'features.11'" in message and "vizcnn summary" in message
    with pytest.raises(vizcnn.LayerNotFound, match="did you mean 'features.9'"):
        resolve_layer(alexnet, "features.99")
    with pytest.raises(KeyError):  # LayerNotFound is also a KeyError for dict-minded callers
        resolve_layer(alexnet, "")
    with pytest.raises(vizcnn.BadArgument, match="unknown layer kind"):
        vizcnn.list_layers(alexnet, "convolution")
