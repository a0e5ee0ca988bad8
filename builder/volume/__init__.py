"""Snapshot volumes: one file holding every blob of a cache's images, byte-exact.

A volume packs an image cache (manifests, indexes, configs, layers) into a single
file, so that registry pulls served from it verify against the original digests.
``format`` defines the file and reads it (any blob found from the trailer and the
index alone); ``packer`` writes it from the store.
"""

from builder.volume.format import (
    CHUNK_SIZE,
    PackProgress,
    ProgressCallback,
    Volume,
    VolumeEntry,
    VolumeVerifyReport,
)
from builder.volume.packer import pack

__all__ = ["CHUNK_SIZE", "PackProgress", "ProgressCallback", "Volume", "VolumeEntry", "VolumeVerifyReport", "pack"]
