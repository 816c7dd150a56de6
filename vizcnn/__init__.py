"""vizcnn: see what a trained convolutional network has learned.

Everything the README shows is reachable from here (and ``vizcnn.render`` for figures)."""

from vizcnn.data.shapes import SHAPE_CLASSES, SHAPE_CONCEPTS, ShapesDataset, held_out_image
from vizcnn.deconv import Deconvnet, Patches, RectificationWarning, TopPatches, top_patches
from vizcnn.doctor import Finding, HealthReport, LayerHealth, doctor
from vizcnn.errors import (
    BadArgument,
    BadCheckpoint,
    BadImage,
    BadOutput,
    LayerNotFound,
    ModelError,
    Unsupported,
    VizCNNError,
)
from vizcnn.evolution import FeatureEvolution, feature_evolution
from vizcnn.hooks import activations, capture
from vizcnn.layers import list_layers
from vizcnn.models import (
    DEMO_PREPROCESSING,
    IMAGENET_PREPROCESSING,
    AssumedPreprocessingWarning,
    ModelInfo,
    Preprocessing,
    load_model,
    model_info,
    preprocess,
    with_model_info,
)
from vizcnn.probes.adversarial import (
    AdversarialResult,
    ExciteResult,
    excite,
    fgsm,
    layer_displacement,
    lbfgs_adversarial,
    pgd,
)
from vizcnn.probes.invariance import InvarianceResult, invariance
from vizcnn.probes.occlusion import OcclusionMaps, occlusion
from vizcnn.receptive import ReceptiveField, receptive_field, receptive_fields
from vizcnn.scan import ImageFolder, TopK, scan_topk
from vizcnn.summary import LayerSummary, format_summary, summarize
from vizcnn.units import Accuracy, ChannelStats, Dissection, accuracy, channel_stats, dissect

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "ImageFolder",
    "accuracy",
    "DEMO_PREPROCESSING",
    "IMAGENET_PREPROCESSING",
    "SHAPE_CLASSES",
    "SHAPE_CONCEPTS",
    "AdversarialResult",
    "AssumedPreprocessingWarning",
    "BadArgument",
    "BadCheckpoint",
    "BadImage",
    "BadOutput",
    "ChannelStats",
    "Deconvnet",
    "Dissection",
    "ExciteResult",
    "FeatureEvolution",
    "Finding",
    "HealthReport",
    "InvarianceResult",
    "LayerHealth",
    "LayerNotFound",
    "LayerSummary",
    "ModelError",
    "ModelInfo",
    "OcclusionMaps",
    "Patches",
    "Preprocessing",
    "ReceptiveField",
    "RectificationWarning",
    "ShapesDataset",
    "TopK",
    "TopPatches",
    "Unsupported",
    "VizCNNError",
    "activations",
    "capture",
    "channel_stats",
    "dissect",
    "doctor",
    "excite",
    "feature_evolution",
    "fgsm",
    "format_summary",
    "held_out_image",
    "invariance",
    "layer_displacement",
    "lbfgs_adversarial",
    "list_layers",
    "load_model",
    "model_info",
    "occlusion",
    "pgd",
    "preprocess",
    "receptive_field",
    "receptive_fields",
    "scan_topk",
    "summarize",
    "top_patches",
    "with_model_info",
]
