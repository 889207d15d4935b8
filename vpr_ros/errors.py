"""User-facing error types.

Every error a user can cause (bad image, bad checkpoint, mismatched map, missing GPU,
bad dataset or bag, bad config) is raised as a subclass of :class:`VprError` with a
message that says what was wrong and, where possible, what to do.  The CLI prints the
message without a traceback and exits with status 2; the ROS node logs it.
"""


class VprError(Exception):
    """Base class of every error caused by user input or environment."""


class ImageError(VprError):
    """An image (file, array or ROS message) is empty, corrupt or of an unsupported type."""


class UnsupportedEncodingError(ImageError):
    """A ROS image encoding this package cannot convert."""


class CheckpointError(VprError):
    """A checkpoint file is missing, truncated, unsafe or does not match the model."""


class ModelCardError(VprError):
    """A model card is missing or invalid."""


class DeviceError(VprError):
    """The requested device or precision is not available."""


class MapError(VprError):
    """A map directory is missing, corrupt or incompatible."""


class MapMismatchError(MapError):
    """A map was built with a different model, descriptor size or format version."""


class DatasetError(VprError):
    """A dataset folder, poses file or training set is missing or malformed."""


class BagError(VprError):
    """A rosbag is missing, empty on a topic, or lacks poses."""


class ConfigError(VprError):
    """A configuration file or parameter is invalid (unknown key, bad value)."""


class OutputError(VprError):
    """An output cannot be written: disk full, read-only file system, no permission."""


class LockedError(VprError):
    """Another process is writing the same output (map, run folder) right now."""
