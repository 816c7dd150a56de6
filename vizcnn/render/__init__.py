"""Rendering: where tensors become NumPy arrays, images and figures (the one other place that
converts to NumPy is ``vizcnn.similarity``, for scikit-image's measures).

``vizcnn.render.figures`` draws matplotlib Figures from results, ``vizcnn.render.grid`` makes
uint8 image grids, and ``vizcnn.render.panels`` runs a probe and draws its figure in one call
(the recipes the CLI and the demo use); ``write_gallery`` writes the browsable site."""

from vizcnn.render import figures, gallery, grid, panels
from vizcnn.render.figures import (
    adversarial_figure,
    excite_figure,
    feature_maps_figure,
    feature_maps_rows,
    feature_visualization_figure,
    featvis_beside_top_figure,
    filters_figure,
    invariance_figure,
    occlusion_figure,
    projection_figure,
    receptive_field_boxes,
    sanity_figure,
    save_figure,
    top_patches_figure,
)
from vizcnn.render.gallery import Gallery, make_gallery, write_gallery
from vizcnn.render.grid import feature_map_grid, filter_grid
from vizcnn.render.panels import Panel

__all__ = [
    "Gallery",
    "Panel",
    "adversarial_figure",
    "excite_figure",
    "feature_map_grid",
    "feature_maps_figure",
    "feature_maps_rows",
    "feature_visualization_figure",
    "featvis_beside_top_figure",
    "figures",
    "filter_grid",
    "filters_figure",
    "gallery",
    "grid",
    "invariance_figure",
    "make_gallery",
    "occlusion_figure",
    "panels",
    "projection_figure",
    "receptive_field_boxes",
    "sanity_figure",
    "save_figure",
    "top_patches_figure",
    "write_gallery",
]
