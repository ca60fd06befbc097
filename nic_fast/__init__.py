"""nic-fast: Neural Image Compression of gigapixel whole-slide images.

A slide becomes a small (A, H', W', C) grid of patch embeddings that an ordinary CNN
can learn from with slide-level labels only (Tellez et al., IEEE TPAMI 2019).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_store"]


def open_store(path):  # noqa: ANN001, ANN201 - thin re-export, typed in nic_fast.store
    """Open a complete compressed-slide store; see :func:`nic_fast.store.open_store`."""
    from nic_fast.store import open_store as _open_store

    return _open_store(path)
