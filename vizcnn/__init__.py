"""vizcnn: see what a trained convolutional network has learned."""

from vizcnn.deconv import Deconvnet, top_patches
from vizcnn.errors import BadArgument, BadCheckpoint, BadImage, LayerNotFound, VizCNNError
from vizcnn.hooks import activations, capture
from vizcnn.layers import list_layers
from vizcnn.models import Preprocessing, load_model, preprocess
from vizcnn.receptive import ReceptiveField, receptive_field
from vizcnn.scan import TopK, scan_topk

__version__ = "0.1.0"

__all__ = [
    "BadArgument",
    "BadCheckpoint",
    "BadImage",
    "Deconvnet",
    "LayerNotFound",
    "Preprocessing",
    "ReceptiveField",
    "TopK",
    "VizCNNError",
    "activations",
    "capture",
    "list_layers",
    "load_model",
    "preprocess",
    "receptive_field",
    "scan_topk",
    "top_patches",
]
