"""Patch sets on disk: a Zarr cache of sampled patches, labelled .npz files and image folders.

Sampling thousands of patches from slides takes minutes of slide reads; the Zarr cache
keeps a sampled set (with neighbours, sources and labels) so the next training run or
a different encoder starts from it in seconds. Labelled sets for the probe and the
supervised baseline come as an ``.npz`` (``images``, ``labels``, optional
``class_names``) or one folder per class of image files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from nic_fast.encoder_training.mnist import binarised_mnist_patches
from nic_fast.encoder_training.patches import PatchSet

CACHE_FORMAT_VERSION = 1
_CACHE_ATTR = "nic_fast_patches"
_CHUNK_PATCHES = 256
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
PATCH_SET_HELP = (
    "a patch set is a Zarr cache written by `nic-fast train-encoder --cache`, an .npz with 'images' "
    "(N, P, P[, C]) uint8 and optional 'labels', or a folder with one sub-folder of images per class"
)

__all__ = ["is_patch_set", "load_patch_cache", "load_patch_set", "save_patch_cache"]


def is_patch_set(path: Path) -> bool:
    """True for what :func:`load_patch_set` reads (a cache, an .npz, a folder); False for slide files."""
    return path.suffix in (".zarr", ".npz") or path.is_dir()


def load_patch_set(path: str | os.PathLike[str], *, mnist_9px: bool = False) -> PatchSet:
    """Read a patch set; ``mnist_9px`` turns 28-px MNIST digits into the synthetic task's 9-px glyphs."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such patch set; {PATCH_SET_HELP}")
    if mnist_9px and path.suffix != ".npz":
        raise ValueError(f"{path}: --mnist-9px converts 28-px digits from an .npz such as mnist-10k.npz only")
    if path.suffix == ".zarr":
        return load_patch_cache(path)
    if path.suffix == ".npz":
        return _load_npz(path, mnist_9px)
    if path.is_dir():
        return _load_folder(path)
    raise ValueError(f"{path}: not a patch set; {PATCH_SET_HELP}")


def save_patch_cache(patches: PatchSet, path: str | os.PathLike[str]) -> Path:
    """Write ``patches`` to a Zarr v3 group at ``path`` (replaced atomically if it exists)."""
    path = Path(path)
    if path.suffix != ".zarr":
        raise ValueError(f"{path}: a patch cache is a Zarr folder ending in .zarr")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.open_group(partial, mode="w", zarr_format=3)
    _write_array(group, "images", patches.images)
    _write_array(group, "source", patches.source)
    if patches.neighbours is not None:
        _write_array(group, "neighbours", patches.neighbours)
    if patches.cells is not None:
        _write_array(group, "cells", patches.cells)
    if patches.labels is not None:
        _write_array(group, "labels", patches.labels)
    group.attrs[_CACHE_ATTR] = {"format_version": CACHE_FORMAT_VERSION, "sources": patches.sources,
                                "mpp": patches.mpp, "class_names": patches.class_names}
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def load_patch_cache(path: Path) -> PatchSet:
    """A patch set written by :func:`save_patch_cache`, loaded into memory."""
    meta = path / "zarr.json"
    attrs = json.loads(meta.read_text()).get("attributes", {}).get(_CACHE_ATTR) if meta.is_file() else None
    if attrs is None:
        raise ValueError(f"{path} is not a nic-fast patch cache (no '{_CACHE_ATTR}' attributes); "
                         "write one with `nic-fast train-encoder ... --cache FILE.zarr`")
    if attrs.get("format_version", 0) > CACHE_FORMAT_VERSION:
        raise ValueError(f"{path}: patch cache format {attrs['format_version']} is newer than this nic-fast "
                         f"reads ({CACHE_FORMAT_VERSION}); upgrade nic-fast")
    group = zarr.open_group(path, mode="r")
    members = set(group.array_keys())

    def read(name: str) -> np.ndarray | None:
        return np.asarray(group[name][...]) if name in members else None

    return PatchSet(images=read("images"), source=read("source"), sources=list(attrs["sources"]), mpp=attrs["mpp"],
                    neighbours=read("neighbours"), cells=read("cells"), labels=read("labels"),
                    class_names=attrs["class_names"])


def _write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    chunks = (min(_CHUNK_PATCHES, max(1, len(data))), *data.shape[1:])
    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data


def _load_npz(path: Path, mnist_9px: bool) -> PatchSet:
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data.files:
            raise ValueError(f"{path}: no 'images' array; {PATCH_SET_HELP}")
        images = data["images"]
        labels = data["labels"].astype(np.int64) if "labels" in data.files else None
        names = [str(n) for n in data["class_names"]] if "class_names" in data.files else None
    if mnist_9px:
        images = binarised_mnist_patches(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (0-255), got {images.dtype}")
    class_names = None
    if labels is not None:
        if labels.min(initial=0) < 0:
            raise ValueError(f"{path}: labels must be class indices ≥ 0")
        class_names = names or [str(k) for k in range(int(labels.max(initial=0)) + 1)]
    return PatchSet(images=images, source=np.zeros(len(images), np.int32), sources=[str(path)], mpp=None,
                    labels=labels, class_names=class_names)


def _load_folder(path: Path) -> PatchSet:
    """One sub-folder per class (its name is the class name), image files inside."""
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"{path}: no class sub-folders; {PATCH_SET_HELP}")
    images, labels = [], []
    for index, class_dir in enumerate(class_dirs):
        for file in sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB")))
            labels.append(index)
    if not images:
        raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images differ in size or channels {sorted(shapes)}; all patches must match")
    stacked = np.stack(images)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return PatchSet(images=stacked, source=np.zeros(len(stacked), np.int32), sources=[str(path)], mpp=None,
                    labels=np.array(labels, np.int64), class_names=[d.name for d in class_dirs])
