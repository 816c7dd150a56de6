"""vizcnn: see what a trained convolutional network has learned."""

from vizcnn.deconv import Deconvnet, top_patches
from vizcnn.errors import BadArgument, BadCheckpoint, BadImage, LayerNotFound, VizCNNError
from vizcnn.hooks import activations, capture
from vizcnn.layers import list_layers
from vizcnn.models import Preprocessing, load_model, preprocess
from vizcnn.probes.adversarial import excite, fgsm, layer_displacement, lbfgs_adversarial, pgd
from vizcnn.probes.invariance import invariance
from vizcnn.probes.occlusion import OcclusionMaps, occlusion
from vizcnn.receptive import ReceptiveField, receptive_field
from vizcnn.scan import TopK, scan_topk

__version__ = "0.1.0"

__all__ = [
    "BadArgument",
    "BadCheckpoint",
    "BadImage",
    "Deconvnet",
    "LayerNotFound",
    "OcclusionMaps",
    "Preprocessing",
    "ReceptiveField",
    "TopK",
    "VizCNNError",
    "activations",
    "capture",
    "excite",
    "fgsm",
    "invariance",
    "layer_displacement",
    "lbfgs_adversarial",
    "list_layers",
    "load_model",
    "occlusion",
    "pgd",
    "preprocess",
    "receptive_field",
    "scan_topk",
    "top_patches",
]
