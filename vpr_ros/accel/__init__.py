"""Acceleration layer: int8 inference and native kernels, kept apart from the model code.

The models in :mod:`vpr_ros.models` are plain PyTorch and read without this package;
:mod:`vpr_ros.inference` converts them here when ``precision="int8"`` is asked for, and
the re-ranking (:mod:`vpr_ros.models.rerank`) calls the native kernels for its verified
exact path.

* :mod:`.int8_kernels` (+ ``int8_kernels.c``) - builds the C kernels with the machine's
  compiler, ctypes bindings;
* :mod:`.int8_linear` - per-token int8 ``Linear`` / 1x1 conv layers;
* :mod:`.int8_block` - whole int8 ViT blocks and the integer attention;
* :mod:`.convert` - :func:`convert_to_int8`, which swaps a model's layers (imports both
  of the above; neither imports it, so there is no import cycle);
* :mod:`.options` - :class:`AccelOptions`, the switches, and the environment overrides;
* :mod:`.workspace` - the per-thread scratch buffers the blocks and kernels reuse.
"""
