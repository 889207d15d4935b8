"""Names and defaults shared by the core, the CLI and the ROS node: one definition each.

Torch-free and import-free, so that ``vpr --help``, argument parsing and the node's
parameter declarations load nothing heavy.  Measured numbers belong in docs/, not here;
these are choices (the reasons are in docs/architecture.md, "Shared constants").
"""

# Inference precisions of the describers (vpr_ros.device maps them to dtypes).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")

# Training autocast precisions (int8 is inference only).
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")

# Arithmetic of the re-ranking mutual-nearest-neighbour counts (vpr_ros.models.rerank).
RERANK_COMPUTES = ("fp32", "bf16")

# int8 models (vpr_ros.accel.options.AccelOptions): the matmul precision of transposed
# convolutions, and the patch embedding as a bf16 matmul or the fp32 convolution.
CONV_TRANSPOSE_COMPUTES = ("bf16", "int8")
PATCH_CONV_COMPUTES = ("bf16", "fp32")

# Largest time gap (s) between two ground-truth poses across which a frame's pose is
# interpolated (map building from bags, bag evaluation, PoseTrack.interpolate).  2 s keeps
# every frame of a 1 Hz GPS track with one missed fix.
MAX_POSE_GAP_S = 2.0

# A query is correct when a retrieved place lies within this distance (m): the usual
# VPR threshold.
RADIUS_M = 25.0

# Largest image (pixels, read from the file header before decoding) that image files and
# compressed frames may have; above it they are refused as bad input (CLI --max-pixels,
# preprocess.load_image / decode_image_bytes ``max_pixels``).  Cameras give at most a few
# tens of megapixels; "decompression bombs" claim billions.
MAX_IMAGE_PIXELS = 50_000_000

# Single-frame confidence (0..1) at or above which a match counts as confident (the pose is
# published when the stream localizer is off).  The stream localizer's threshold comes
# from its calibration in the map manifest instead.
CONFIDENCE_THRESHOLD = 0.5

# Precision the stream localizer's published-pose threshold is fitted for.
TARGET_PRECISION = 0.99
