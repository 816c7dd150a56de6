"""vizcnn: see what a trained convolutional network has learned."""

from vizcnn.deconv import Deconvnet, RectificationWarning, top_patches
from vizcnn.errors import (
    BadArgument,
    BadCheckpoint,
    BadImage,
    LayerNotFound,
    ModelError,
    VizCNNError,
)
from vizcnn.hooks import activations, capture
from vizcnn.layers import list_layers
from vizcnn.models import (
    AssumedPreprocessingWarning,
    Preprocessing,
    load_model,
    preprocess,
    preprocessing_for,
    with_preprocessing,
)
from vizcnn.probes.adversarial import excite, fgsm, layer_displacement, lbfgs_adversarial, pgd
from vizcnn.probes.invariance import invariance
from vizcnn.probes.occlusion import OcclusionMaps, occlusion
from vizcnn.receptive import ReceptiveField, receptive_field
from vizcnn.scan import TopK, scan_topk

__version__ = "0.1.0"

__all__ = [
    "AssumedPreprocessingWarning",
    "BadArgument",
    "BadCheckpoint",
    "BadImage",
    "Deconvnet",
    "LayerNotFound",
    "ModelError",
    "OcclusionMaps",
    "Preprocessing",
    "ReceptiveField",
    "RectificationWarning",
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
    "preprocessing_for",
    "receptive_field",
    "scan_topk",
    "top_patches",
    "with_preprocessing",
]
