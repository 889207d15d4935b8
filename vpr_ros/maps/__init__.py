"""Maps: a versioned directory of places, descriptors and a FAISS index (docs/maps.md)."""

from .builder import add_to_map, build_map, set_confidence_params, set_stream_calibration
from .format import FORMAT_VERSION, PlaceTable, read_manifest
from .index import build_index
from .place_map import PlaceMap
from .sources import (BagSource, MapEntry, benchmark_source, folder_source, read_poses_csv,
                      select_keyframes)

__all__ = ["FORMAT_VERSION", "BagSource", "MapEntry", "PlaceMap", "PlaceTable", "add_to_map",
           "benchmark_source", "build_index", "build_map", "folder_source", "read_manifest",
           "read_poses_csv", "select_keyframes", "set_confidence_params",
           "set_stream_calibration"]
