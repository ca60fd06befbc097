"""Regions as QuPath annotations (GeoJSON) and users' masks back into boolean masks.

A lab checks and corrects tissue detection in QuPath: ``tissue_geojson`` turns a mask
into a GeoJSON FeatureCollection of QuPath annotations classified "Tissue" (QuPath's
GeoJSON export and import: ``properties.objectType = "annotation"``,
``properties.classification = {"name", "color"}``), polygons with their holes, in level-0
pixel coordinates (QuPath's: origin at the top-left corner of the full-resolution
image). ``read_tissue_mask`` reads such a file back, or a binary PNG/TIFF mask, at a
thumbnail's resolution, so that the grid's cells follow from it exactly as from the
automatic mask (:func:`nic_fast.tissue.tissue_from_mask`).

Outlines are traced by OpenCV on the mask upsampled twice, so each runs a quarter of a
mask pixel inside the pixels' edges: every tissue pixel's centre is inside, every other
centre outside, and filling the polygons at pixel centres gives the mask back exactly.
"""
from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IGNORE_CLASS_PREFIX",
    "MASK_SUFFIXES",
    "TISSUE_CLASS",
    "TISSUE_COLOR",
    "MaskFileError",
    "find_mask_for",
    "mask_features",
    "mask_polygons",
    "read_tissue_mask",
    "tissue_geojson",
    "write_geojson",
]

TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (20, 180, 60)  # RGB of the "Tissue" class in QuPath
IGNORE_CLASS_PREFIX = "Ignore"  # QuPath's built-in "Ignore*" class: regions left out of analysis
MASK_SUFFIXES = (".tissue.geojson", ".geojson", ".json", ".png", ".tif", ".tiff")
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
_ASPECT_TOLERANCE = 0.02  # an image mask's width/height may differ this much from the slide's
_BOUNDS_TOLERANCE = 0.05  # polygons may reach this far (of the slide's size) beyond its edges
_FIXED_POINT_BITS = 8  # sub-pixel precision of OpenCV's polygon fill
_FILLED_SAMPLES = 4  # of a mask pixel's 2 x 2 fine pixels filled, for the pixel to count (see _fill)
_ID_NAMESPACE = uuid.UUID("1b671a64-40d5-491e-99b0-da01ff1f3341")


class MaskFileError(ValueError):
    """A user's mask file cannot be used; the message names the file, the problem and the fix."""


# --------------------------------------------------------------------------- mask -> GeoJSON


def mask_polygons(mask: np.ndarray, *, level0_px_per_mask_px: float, min_area_mask_px: float = 0.0,
                  origin_xy_level0_px: tuple[float, float] = (0.0, 0.0)) -> list[Any]:
    """The regions of a bool mask as shapely Polygons (holes kept) in level-0 px.

    Mask pixel (0, 0) starts at ``origin_xy_level0_px`` (x, y) of level 0. Regions whose
    outline encloses less than ``min_area_mask_px`` mask pixels are dropped; holes are
    always kept (a hole is a tissue edge, however small).
    """
    import cv2
    import shapely

    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-d (height, width), got shape {mask.shape}")
    doubled = np.kron(np.ascontiguousarray(mask, dtype=np.uint8), np.ones((2, 2), np.uint8))
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    scale = level0_px_per_mask_px / 2.0

    origin = np.asarray(origin_xy_level0_px, np.float64)

    def ring(index: int) -> np.ndarray:
        return (contours[index].reshape(-1, 2).astype(np.float64) + 0.5) * scale + origin

    polygons = []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    for index, (_, _, child, parent) in enumerate(links):
        if parent >= 0:
            continue
        holes = []
        while child >= 0:
            holes.append(ring(child))
            child = links[child][0]
        outline = ring(index)
        if len(outline) < 3 or shapely.Polygon(_closed(outline)).area < min_area_mask_px * level0_px_per_mask_px**2:
            continue
        polygons.extend(_valid_parts(shapely.Polygon(_closed(outline), [_closed(h) for h in holes if len(h) >= 3])))
    return polygons


def _closed(points: np.ndarray) -> np.ndarray:
    return points if len(points) < 3 else np.vstack([points, points[:1]])


def _valid_parts(geometry: Any) -> Iterator[Any]:
    """The polygons of a geometry, made valid (OpenCV traces pinches that GEOS rejects)."""
    import shapely

    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
    if geometry.geom_type == "Polygon":
        if not geometry.is_empty:
            yield geometry
    elif hasattr(geometry, "geoms"):
        for part in geometry.geoms:
            yield from _valid_parts(part)


def mask_features(mask: np.ndarray, *, level0_px_per_mask_px: float, classification: str,
                  color: Sequence[int], min_area_mask_px: float = 0.0, id_seed: str = "",
                  origin_xy_level0_px: tuple[float, float] = (0.0, 0.0),
                  extra_properties: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One QuPath annotation Feature per region of ``mask`` (see :func:`mask_polygons`).

    Feature ids are UUIDs derived from ``id_seed`` and the region's index, so the same
    mask gives the same file. ``extra_properties`` go into every feature's properties.
    """
    from shapely.geometry import mapping

    features = []
    polygons = mask_polygons(mask, level0_px_per_mask_px=level0_px_per_mask_px, min_area_mask_px=min_area_mask_px,
                             origin_xy_level0_px=origin_xy_level0_px)
    for index, polygon in enumerate(polygons):
        geometry = mapping(polygon)
        geometry["coordinates"] = [[[round(x, 3), round(y, 3)] for x, y in ring] for ring in geometry["coordinates"]]
        properties = {"objectType": "annotation", "classification": {"name": classification, "color": list(color)},
                      "isLocked": False, **(extra_properties or {})}
        features.append({"type": "Feature", "id": str(uuid.uuid5(_ID_NAMESPACE, f"{id_seed}/{classification}/{index}")),
                         "geometry": geometry, "properties": properties})
    return features


def tissue_geojson(mask: np.ndarray, level0_px_per_mask_px: float, *, min_area_mask_px: float = 16.0,
                   name: str = "") -> dict[str, Any]:
    """A tissue mask as a GeoJSON FeatureCollection of QuPath "Tissue" annotations.

    ``level0_px_per_mask_px`` is the mask's downsample (a store's ``thumbnail_downsample``);
    ``name`` (e.g. the slide's file name) seeds the feature ids. Regions under
    ``min_area_mask_px`` (default a quarter of an 8-px cell) are dropped as specks.
    """
    features = mask_features(mask, level0_px_per_mask_px=level0_px_per_mask_px, classification=TISSUE_CLASS,
                             color=TISSUE_COLOR, min_area_mask_px=min_area_mask_px, id_seed=name)
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: dict[str, Any]) -> Path:
    """Write a FeatureCollection (compact: these files hold many vertices)."""
    path = Path(path)
    path.write_text(json.dumps(collection, separators=(",", ":")) + "\n")
    return path


# --------------------------------------------------------------------------- user mask -> bool mask


def find_mask_for(slide_path: str | Path, masks_dir: str | Path) -> Path | None:
    """The user's mask file for a slide in ``masks_dir``, or None when it has none.

    Looks for ``<stem><suffix>`` and ``<file name><suffix>`` (``slide.svs.geojson``, as
    some exports name it) for each of :data:`MASK_SUFFIXES` (``<stem>.tissue.geojson``
    is what compress writes, so a corrected copy of it can be given back). More than one
    match is an error: which one the user meant is not ours to guess.
    """
    slide_path, masks_dir = Path(slide_path), Path(masks_dir)
    if not masks_dir.is_dir():
        raise MaskFileError(f"{masks_dir}: not a folder of tissue masks; give the folder that holds "
                            f"<slide>.geojson or <slide>.png files")
    names = {f"{base}{suffix}" for base in (slide_path.stem, slide_path.name) for suffix in MASK_SUFFIXES}
    found = sorted(p for p in (masks_dir / n for n in names) if p.is_file())
    if len(found) > 1:
        listed = ", ".join(p.name for p in found)
        raise MaskFileError(f"{masks_dir}: several masks for {slide_path.name} ({listed}); keep one of them")
    return found[0] if found else None


def read_tissue_mask(path: str | Path, *, mask_shape: tuple[int, int], level0_px_per_mask_px: float,
                     level0_shape: tuple[int, int], classes: Iterable[str | None] | None = None) -> np.ndarray:
    """A user's tissue mask file as a bool mask of ``mask_shape`` (thumbnail pixels,
    ``level0_px_per_mask_px`` level-0 px each) for a slide of ``level0_shape`` (h, w).

    GeoJSON (QuPath's export: a FeatureCollection, a list of features, one feature or a
    bare geometry): Polygon and MultiPolygon regions with their holes, in level-0 px.
    Annotations classified "Tissue" or unclassified are tissue (``classes`` replaces that
    set; None in it means unclassified); QuPath's "Ignore*" annotations are cut out of
    them; other classes (Tumor, Stroma, ...) are left out. Detections, points and lines
    are not regions and are left out too. A pixel is tissue when its centre is inside
    (see :func:`_fill`).

    PNG/TIFF: a binary image of the whole slide at any size, non-zero = tissue,
    resampled to ``mask_shape`` by area (a pixel is tissue when at least half of it is).
    """
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"{path}: no such mask file; give a GeoJSON (QuPath export) or a binary PNG/TIFF")
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return _read_image_mask(path, mask_shape, level0_px_per_mask_px, level0_shape)
    if path.suffix.lower() in (".geojson", ".json"):
        wanted = {TISSUE_CLASS, None} if classes is None else set(classes)
        return _read_geojson_mask(path, mask_shape, level0_px_per_mask_px, level0_shape, wanted)
    raise MaskFileError(f"{path}: unknown mask format {path.suffix!r}; give a .geojson (QuPath export) "
                        f"or a binary .png/.tif mask")


def _read_geojson_mask(path: Path, mask_shape: tuple[int, int], level0_px_per_mask_px: float,
                       level0_shape: tuple[int, int], wanted: set[str | None]) -> np.ndarray:
    import shapely

    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskFileError(f"{path}: not a readable JSON file ({exc}); export the annotations from QuPath "
                            f"again (File > Export objects as GeoJSON)") from exc
    keep, cut, seen = [], [], set()
    for feature in _features(document, path):
        if (feature.get("properties") or {}).get("objectType", "annotation") != "annotation":
            continue
        name = _class_name(feature)
        seen.add(name)
        regions = list(_regions(feature.get("geometry"), path))
        if name is not None and name.startswith(IGNORE_CLASS_PREFIX):
            cut += regions
        elif name in wanted:
            keep += regions
    if not keep:
        found = ", ".join(sorted("unclassified" if n is None else repr(n) for n in seen)) or "none"
        wanted_names = ", ".join(sorted("unclassified" if n is None else repr(n) for n in wanted))
        raise MaskFileError(f"{path}: no {wanted_names} polygon annotation (annotation classes found: {found}); "
                            f"classify the tissue regions as 'Tissue' (or leave them unclassified) and export again")
    tissue = shapely.unary_union(keep)
    if cut:
        tissue = tissue.difference(shapely.unary_union(cut))
    _check_bounds(path, tissue.bounds, level0_shape)
    return _fill(tissue, mask_shape, level0_px_per_mask_px)


def _features(document: Any, path: Path) -> Iterator[dict[str, Any]]:
    if isinstance(document, list):
        items: list[Any] = document
    elif isinstance(document, dict) and document.get("type") == "FeatureCollection":
        items = document.get("features") or []
    elif isinstance(document, dict) and document.get("type") == "Feature":
        items = [document]
    elif isinstance(document, dict) and "coordinates" in document:
        items = [{"type": "Feature", "geometry": document, "properties": {}}]
    else:
        raise MaskFileError(f"{path}: not GeoJSON (no FeatureCollection, Feature or geometry); export the "
                            f"annotations from QuPath as GeoJSON")
    for item in items:
        if not isinstance(item, dict) or "geometry" not in item:
            raise MaskFileError(f"{path}: a feature without a geometry ({str(item)[:60]}...); export the annotations "
                                f"from QuPath as GeoJSON")
        yield item


def _class_name(feature: dict[str, Any]) -> str | None:
    """QuPath's class: ``{"name": ...}`` or, for derived classes, ``{"names": [...]}``."""
    classification = (feature.get("properties") or {}).get("classification")
    if not isinstance(classification, dict):
        return None
    if classification.get("name"):
        return str(classification["name"])
    names = classification.get("names")
    return ": ".join(str(n) for n in names) if names else None


def _regions(geometry: Any, path: Path) -> Iterator[Any]:
    """The areal parts (Polygon, MultiPolygon, inside GeometryCollections) of a GeoJSON geometry."""
    import shapely.geometry

    if not geometry:
        return
    try:
        shape = shapely.geometry.shape(geometry)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise MaskFileError(f"{path}: a geometry cannot be read ({exc}); export the annotations from QuPath "
                            f"as GeoJSON again") from exc
    if shape.geom_type in ("Polygon", "MultiPolygon", "GeometryCollection"):
        yield from _valid_parts(shape)


def _check_bounds(path: Path, bounds: tuple[float, float, float, float], level0_shape: tuple[int, int]) -> None:
    height, width = level0_shape
    x0, y0, x1, y1 = bounds
    slack_x, slack_y = _BOUNDS_TOLERANCE * width, _BOUNDS_TOLERANCE * height
    if x0 < -slack_x or y0 < -slack_y or x1 > width + slack_x or y1 > height + slack_y:
        raise MaskFileError(f"{path}: its polygons span x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f} px, beyond the "
                            f"slide's {width}x{height} px at full resolution; give the mask drawn on this slide "
                            f"(coordinates in full-resolution pixels)")


def _fill(geometry: Any, mask_shape: tuple[int, int], level0_px_per_mask_px: float) -> np.ndarray:
    """Mask pixels whose centre lies inside ``geometry`` (level-0 px).

    OpenCV's fill takes every pixel its outline touches, so it is run on a grid twice as
    fine and a mask pixel counts when all of its 2 x 2 fine pixels are filled: for an
    edge along either axis that is exactly "its centre is inside" (the fine pixels reach
    a quarter pixel either side of it), so rectangles on the pixel grid and the outlines
    of :func:`mask_polygons` give their pixels exactly; slanted outlines are within half
    a pixel of it (measured: 95 % of the differing pixels within a quarter).
    """
    import cv2

    height, width = mask_shape
    fine = np.zeros((2 * height, 2 * width), np.uint8)
    rings = []
    for polygon in _valid_parts(geometry):
        for ring in (polygon.exterior, *polygon.interiors):
            # A fine pixel u has its centre at mask coordinate (u + 0.5) / 2; OpenCV puts it at u.
            points = np.asarray(ring.coords, np.float64) * (2.0 / level0_px_per_mask_px) - 0.5
            rings.append(np.round(points * (1 << _FIXED_POINT_BITS)).astype(np.int32))
    if rings:  # disjoint polygons after the union: the even-odd fill leaves holes empty
        cv2.fillPoly(fine, rings, 1, lineType=cv2.LINE_8, shift=_FIXED_POINT_BITS)
    return fine.reshape(height, 2, width, 2).sum(axis=(1, 3)) >= _FILLED_SAMPLES


def _read_image_mask(path: Path, mask_shape: tuple[int, int], level0_px_per_mask_px: float,
                     level0_shape: tuple[int, int]) -> np.ndarray:
    import cv2

    image = _load_image(path, mask_shape)
    binary = (image > 0) if image.ndim == 2 else (image[..., :3] > 0).any(axis=-1)
    height0, width0 = level0_shape
    img_h, img_w = binary.shape
    if abs((img_w / img_h) / (width0 / height0) - 1.0) > _ASPECT_TOLERANCE:
        raise MaskFileError(f"{path}: a {img_w}x{img_h} px mask cannot cover this {width0}x{height0} px slide "
                            f"(aspect ratios differ); give a mask image of the whole slide")
    covered = (min(mask_shape[0], max(1, round(height0 / level0_px_per_mask_px))),
               min(mask_shape[1], max(1, round(width0 / level0_px_per_mask_px))))
    area = cv2.resize(binary.astype(np.float32), (covered[1], covered[0]), interpolation=cv2.INTER_AREA)
    mask = np.zeros(mask_shape, bool)
    mask[: covered[0], : covered[1]] = area >= 0.5
    return mask


def _load_image(path: Path, mask_shape: tuple[int, int]) -> np.ndarray:
    """Pixels of a mask image; for a pyramidal TIFF, the smallest level at least ``mask_shape``."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                levels = tif.series[0].levels
                fitting = [lv for lv in levels if lv.shape[0] >= mask_shape[0] and lv.shape[1] >= mask_shape[1]]
                level = min(fitting, key=lambda lv: math.prod(lv.shape)) if fitting else levels[0]
                image = np.squeeze(level.asarray())
        else:
            from PIL import Image

            with Image.open(path) as pil:
                image = np.asarray(pil)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the user's file
        raise MaskFileError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc}); give a binary "
                            f"PNG/TIFF (non-zero = tissue) or a GeoJSON") from exc
    if image.ndim not in (2, 3) or image.size == 0:
        raise MaskFileError(f"{path}: has shape {image.shape}, not a 2-d mask image; give a binary PNG/TIFF "
                            f"(non-zero = tissue)")
    return image
