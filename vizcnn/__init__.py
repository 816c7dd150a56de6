"""vizcnn: see what a trained convolutional network has learned.

Everything the README shows is reachable from here (and ``vizcnn.render`` for figures).

``import vizcnn`` itself imports nothing heavy: the names below are loaded, all at once, the
first time one of them is used. So the ``vizcnn`` command can answer Ctrl-C (exit 130, one
line) from its very first step, and ``vizcnn --help`` does not wait for PyTorch."""

import importlib

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
    "FeatureVisualization",
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
    "SanityCheck",
    "ShapeSample",
    "ShapesDataset",
    "Similarities",
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
    "feature_visualization",
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
    "sanity_check",
    "scan_topk",
    "summarize",
    "top_patches",
    "with_model_info",
]


def _load_api() -> dict:
    """Import the public API (the first time a name of it is used); returns its names."""
    from vizcnn.data.shapes import (
        SHAPE_CLASSES,
        SHAPE_CONCEPTS,
        ShapeSample,
        ShapesDataset,
        held_out_image,
    )
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
    from vizcnn.featvis import FeatureVisualization, feature_visualization
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
    from vizcnn.sanity import SanityCheck, sanity_check
    from vizcnn.scan import ImageFolder, TopK, scan_topk
    from vizcnn.similarity import Similarities
    from vizcnn.summary import LayerSummary, format_summary, summarize
    from vizcnn.units import Accuracy, ChannelStats, Dissection, accuracy, channel_stats, dissect

    return {name: value for name, value in locals().items() if name in __all__}


def __getattr__(name: str):
    """PEP 562: the public API (and the subpackages, e.g. ``vizcnn.render``) on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    globals().update(_load_api())
    if name not in globals():
        try:
            importlib.import_module(f"vizcnn.{name}")  # binds itself here, as any submodule
        except ModuleNotFoundError as error:
            if error.name != f"vizcnn.{name}":
                raise
            raise AttributeError(f"module 'vizcnn' has no attribute {name!r}") from None
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
