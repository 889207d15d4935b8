"""Images in, descriptors out: the one inference API every other part uses.

``GlobalDescriber`` turns RGB images into unit-length global descriptors (SciceVPR,
Super-CricaVPR or the SelaVPR global branch); ``LocalFeatureExtractor`` gives SelaVPR's
global descriptor plus its dense (H, W, C) local features (61 x 61 officially) for
re-ranking.  Both take a model card (name, path or :class:`ModelCard`; None = the default
card), an optional weights file, a device ("auto" | "cpu" | "cuda[:N]"), a precision
("fp32" | "bf16" | "fp16" | "int8", fp16 on CUDA only, int8 on the CPU only) and a batch
size.

Precisions (speed and fidelity measured in docs/fast_paths.md):

* ``fp32``: exact parity with the official models.
* ``bf16``: on CUDA ``torch.autocast``; on the CPU the network's weights are cast to
  bfloat16 once (no per-call weight casts, which autocast pays on every forward), except
  the numerically delicate tail: GeM pooling (its learned exponent stays float32, so the
  ``pow(p)`` / mean / ``pow(1/p)`` run in float32) and everything after it (the SciceVPR
  region encoder, the final L2 normalisations).  LayerNorm statistics are accumulated in
  float32 by PyTorch's bf16 kernels.
* ``fp16``: CUDA autocast.
* ``int8`` (CPU): :mod:`vpr_ros.accel.int8_linear`: every Linear layer and the 1x1
  ``fusion`` convolution run with int8 weights (one scale per output channel) and int8
  activations quantised per call with one scale per row, i.e. per token of one image,
  multiplied exactly in int32 (``torch._int_mm``).  No scale is shared between images,
  so a whole batch runs in one forward and the int8 layers give an image the same bits
  alone or in a batch (SciceVPR int8 descriptors are bit-identical; checked in
  test/test_int8_linear.py).  LayerNorm, GELU, the patch embedding, GeM and the
  attention of the SciceVPR region encoder compute in float32 (its feed-forward layers
  are int8 Linears too); SelaVPR's LocalAdapt transposed
  convolutions run as a bf16 matmul + col2im.  The passes between two int8 matmuls
  (quantise, dequantise + bias, LayerNorm, GELU, residual add) run fused in small C
  kernels compiled on first use (:mod:`vpr_ros.accel.int8_kernels`), and with them the
  ViT blocks' attention runs on int16 codes of Q, K, V and the softmax weights
  (:mod:`vpr_ros.accel.int8_block`).  The switches are ``accel=AccelOptions(...)``
  (:mod:`vpr_ros.accel.options`: native kernels, integer attention, kernel cache).
  Where no C compiler is found the torch ops run, with float32 SDPA attention.

Images are preprocessed with
:func:`vpr_ros.preprocess.preprocess` (the official evaluation pipeline).

``fingerprint`` identifies the weights ("sha256:<hex>" of the file or
"random:<seed>:<card>"); maps store it so a map is never queried with another model.

SciceVPR descriptors never depend on the batch: ``describe([a])[0] == describe([a, b])[0]``
(up to float rounding).  The Super-CricaVPR teacher is batch dependent by design.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from .device import autocast_context, resolve_device, resolve_precision
from .errors import ImageError, ModelCardError
from .models.cards import ModelCard, load_card
from .models.factory import load_model
from .preprocess import iter_batches, preprocess

CardLike = Union[str, os.PathLike, ModelCard, None]


def cast_weights_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast ``model`` to bfloat16 in place, keeping GeM and what follows it in float32.

    GeM modules keep their float32 exponent ``p`` (type promotion then runs the
    ``pow``/mean in float32 and the rest of the head sees float32 tensors); the SciceVPR
    region encoder (14 tokens per image: negligible cost) stays float32 for that reason.
    """
    from .models.scicevpr import GeM

    model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, (GeM, torch.nn.TransformerEncoder)):
            module.float()
    return model


def quantize_int8(model: torch.nn.Module, accel=None) -> torch.nn.Module:
    """Batch-invariant int8 (CPU), in place: see :mod:`vpr_ros.accel.int8_linear`.

    Every ``nn.Linear`` and the pointwise (1x1) convolutions become int8 layers with
    per-output-channel weight scales and per-row (per-token) activation scales computed
    on each call, multiplied exactly in int32 (the native VNNI matmul, else
    ``torch._int_mm``: the same integers).  The attention of the SciceVPR region
    encoder (``nn.MultiheadAttention``, 14 tokens per image) and GeM stay float32.  The
    native fused kernels (:mod:`vpr_ros.accel.int8_kernels`) are built here, at model
    construction, so that the first image does not wait for the compiler.  ``accel``: the
    switches (:class:`vpr_ros.accel.options.AccelOptions`; None = overrides / defaults).
    """
    from .accel.convert import convert_to_int8
    from .accel.int8_kernels import native_kernels
    from .accel.options import AccelOptions

    accel = accel if accel is not None else AccelOptions()
    native_kernels(accel.native_kernels, accel.kernel_cache)
    return convert_to_int8(model, options=accel)


class _ModelRunner:
    """Shared set-up: card, weights, device, precision, batching."""

    def __init__(self, card: CardLike = None, weights: Union[str, os.PathLike, None] = None,
                 device: Union[str, torch.device] = "auto", precision: str = "fp32",
                 batch_size: int = 8, accel=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.precision = str(precision).strip().lower()
        self.batch_size = int(batch_size)
        self.model, self.card, self.fingerprint = load_model(load_card(card), weights, self.device)
        self.input_size: Tuple[int, int] = tuple(self.card.input_size)
        # how the forward runs: input dtype, autocast or not
        self._input_dtype = torch.float32       # bfloat16 when the weights are bfloat16
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            cast_weights_bf16(self.model)
            self._input_dtype = torch.bfloat16
        elif self.dtype == torch.qint8:
            self.model = quantize_int8(self.model, accel)
        self.accel = accel

    def _forward(self, fn, x: torch.Tensor):
        """``fn(x)`` under this runner's precision set-up (whole batch in one forward)."""
        if self._input_dtype != torch.float32:      # weights already cast: no autocast
            return fn(x.to(self._input_dtype))
        with autocast_context(self.device, self.dtype):
            return fn(x)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(f"expected a preprocessed (B, 3, H, W) tensor, got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_size:
            raise ImageError(f"input is {tuple(x.shape[-2:])} but model {self.card.name!r} takes "
                             f"{self.input_size}; preprocess with size={self.input_size}")
        return x.to(self.device, torch.float32, non_blocking=True)

    def _batches(self, images: Sequence[np.ndarray], progress: bool, desc: str):
        images = list(images)
        batches = iter_batches(images, self.batch_size)
        if progress:
            from tqdm import tqdm
            total = (len(images) + self.batch_size - 1) // self.batch_size
            batches = tqdm(batches, total=total, desc=desc, unit="batch")
        return batches


class GlobalDescriber(_ModelRunner):
    """Global place descriptors: ``describe(images) -> (N, dim) float32``, unit L2."""

    def __init__(self, card: CardLike = None, weights=None, device="auto",
                 precision: str = "fp32", batch_size: int = 8, accel=None):
        super().__init__(card, weights, device, precision, batch_size, accel)
        self.dim = int(self.card.descriptor_dim)

    @torch.inference_mode()
    def describe_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, H, W) input -> (B, dim) float32 descriptors on the device."""
        x = self._check_input(x)
        fn = self.model.forward_global if self.card.architecture == "selavpr" else self.model
        out = self._forward(fn, x)
        out = out.float()
        if self.dtype != torch.float32:  # re-normalise after reduced-precision arithmetic
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out

    def describe(self, images: Sequence[np.ndarray], color_order: str = "rgb",
                 progress: bool = False) -> np.ndarray:
        """RGB (or ``color_order``) uint8 images -> (N, dim) float32, unit L2 rows."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        row = 0
        for batch in self._batches(images, progress, "describe"):
            x = preprocess(batch, self.input_size, color_order)
            desc = self.describe_tensor(x).cpu().numpy()
            out[row:row + len(batch)] = desc
            row += len(batch)
        return out

    def describe_files(self, paths: Sequence, progress: bool = False,
                       chunk: int = 64) -> np.ndarray:
        """(N, dim) float32 unit descriptors of image files, in order, ``chunk`` files
        decoded at a time (an image list never holds the whole folder)."""
        from tqdm import tqdm

        from .preprocess import load_image

        paths = list(paths)
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        for start in tqdm(range(0, len(paths), chunk), desc="describe", leave=False,
                          disable=not progress):
            part = paths[start:start + chunk]
            out[start:start + len(part)] = self.describe([load_image(p) for p in part])
        return out


class LocalFeatureExtractor(_ModelRunner):
    """SelaVPR: ``extract(images) -> (global (N, Dg) float32, local (N, H, W, C) float16)``
    (``card.local_shape``: 61 x 61 x 128 for the official ViT-L)."""

    def __init__(self, card: CardLike = None, weights=None, device="auto",
                 precision: str = "fp32", batch_size: int = 8, accel=None):
        card_obj = load_card(card if card is not None else "selavpr_tiny_random")
        if card_obj.architecture != "selavpr":
            raise ModelCardError(f"local features need a SelaVPR model card; {card_obj.name!r} is "
                                 f"{card_obj.architecture} (try --local-model selavpr_vitl14)")
        super().__init__(card_obj, weights, device, precision, batch_size, accel)
        self.global_dim = int(self.card.descriptor_dim)
        self.dim = self.global_dim
        self.local_shape: Tuple[int, int, int] = tuple(self.card.local_shape)

    @torch.inference_mode()
    def extract_tensor(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed input -> (global (B, Dg) float32, local (B, H, W, C) float32)."""
        x = self._check_input(x)
        glob, local = self._forward(self.model, x)
        glob, local = glob.float(), local.float()
        if self.dtype != torch.float32:
            glob = torch.nn.functional.normalize(glob, p=2, dim=-1)
            local = torch.nn.functional.normalize(local, p=2, dim=-1)
        return glob, local

    def extract(self, images: Sequence[np.ndarray], color_order: str = "rgb",
                progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        images = list(images)
        n = len(images)
        glob_out = np.empty((n, self.global_dim), dtype=np.float32)
        local_out = np.empty((n,) + self.local_shape, dtype=np.float16)
        row = 0
        for batch in self._batches(images, progress, "local features"):
            x = preprocess(batch, self.input_size, color_order)
            glob, local = self.extract_tensor(x)
            glob_out[row:row + len(batch)] = glob.cpu().numpy()
            local_out[row:row + len(batch)] = local.to(torch.float16).cpu().numpy()
            row += len(batch)
        return glob_out, local_out
