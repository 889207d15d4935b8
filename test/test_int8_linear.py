"""Per-token int8 Linear layers (vpr_ros.accel.int8_linear) and ``precision="int8"``.

Checks: the integer path is exact (int32 products equal an int64 reference, outputs equal
a float64 evaluation of the same quantisation), the float fallback gives the same
integers for shapes of any size, conversion covers Linear and pointwise Conv2d layers
and folds LayerScales, descriptors are bit-identical alone and within a batch, and int8
stays close to fp32 on real images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from vpr_ros.errors import DeviceError
from vpr_ros.accel.convert import convert_to_int8
from vpr_ros.accel.int8_linear import (InplaceGELU, Int8Linear, Int8PointwiseConv2d,
                                       count_int8_layers, fold_block_layer_scales,
                                       integer_matmul, quantize_rows)


def _linear(k: int, n: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer.eval()


def _float64_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same quantisation evaluated in float64 (no integer kernel involved)."""
    q, row_scale = quantize_rows(x.reshape(-1, layer.in_features))
    acc = q.double() @ layer.weight_int8.double()
    out = acc * row_scale.double() * layer.weight_scale.double()
    if layer.bias is not None:
        out = out + layer.bias.double()
    return out.reshape(*x.shape[:-1], layer.out_features)


def test_quantize_rows_symmetric_per_row():
    torch.manual_seed(1)
    x = torch.randn(20, 37) * torch.logspace(-3, 3, 20).unsqueeze(1)   # rows of very different size
    x[3] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (20, 1)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.all(q[3] == 0) and torch.isfinite(scale).all()
    nonzero = torch.arange(20) != 3
    assert torch.all(q[nonzero].abs().amax(1) == 127)          # every row uses its full range
    err = (q.float() * scale - x).abs()
    assert torch.all(err <= scale * 0.5 * (1 + 1e-5))           # round to nearest
    # one row quantised alone gives the same int8 values and scale
    q_alone, s_alone = quantize_rows(x[7:8])
    assert torch.equal(q_alone, q[7:8]) and torch.equal(s_alone, scale[7:8])


@pytest.mark.parametrize("m,k,n", [(257, 768, 96), (40, 64, 48), (3, 8, 8)])
def test_integer_path_exact(m, k, n):
    layer = Int8Linear.from_linear(_linear(k, n))
    torch.manual_seed(2)
    x = torch.randn(m, k)
    q, _ = quantize_rows(x)
    acc = integer_matmul(q, layer.weight_int8)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), q.long() @ layer.weight_int8.long())
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    ref = _float64_reference(layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    # and the quantisation error against the float layer is small
    float_layer = _linear(k, n)
    w_err = (layer.dequantized_weight() - float_layer.weight).abs()
    assert torch.all(w_err <= layer.weight_scale.unsqueeze(1) * 0.5 * (1 + 1e-5))
    float_out = float_layer(x)
    assert (out - float_out).abs().max() < 0.05 * float_out.abs().max()


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 13, 7), (17, 3, 250), (9, 2000, 5)])
def test_float_fallback_same_integers_for_odd_shapes(m, k, n):
    torch.manual_seed(3)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    exact = a.long() @ b.long()
    fallback = integer_matmul(a, b, use_int_mm=False)   # K=2000 takes the float64 branch
    assert fallback.dtype == torch.int32 and torch.equal(fallback.long(), exact)
    assert torch.equal(integer_matmul(a, b).long(), exact)

    layer = Int8Linear.from_linear(_linear(k, n, seed=4))
    x = torch.randn(2, m, k)                               # 3-D input: rows are the leading dims
    y_int_mm = layer(x)
    layer.use_int_mm = False
    y_fallback = layer(x)
    assert y_int_mm.shape == (2, m, n)
    assert torch.equal(y_int_mm, y_fallback)


def test_linear_without_bias_and_other_input_dtype():
    layer = Int8Linear.from_linear(_linear(32, 24, bias=False))
    assert layer.bias is None
    x = torch.randn(30, 32)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    ref = _float64_reference(layer, x.to(torch.bfloat16).float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_inplace_gelu_equals_gelu():
    x = torch.randn(40, 33) * 4
    for approximate in ("none", "tanh"):
        expected = nn.GELU(approximate)(x)
        y = x.clone()
        out = InplaceGELU(approximate)(y)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, expected)


def test_pointwise_conv_as_linear():
    torch.manual_seed(5)
    conv = nn.Conv2d(24, 10, kernel_size=1).eval()
    x = torch.randn(2, 24, 5, 6)
    int8 = Int8PointwiseConv2d.from_conv(conv)
    y = int8(x)
    ref = conv(x)
    assert y.shape == ref.shape
    cos = nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999
    # each pixel is its own row: one image alone gives the same bits
    assert torch.equal(int8(x[1:2]), y[1:2])
    with pytest.raises(ValueError, match="pointwise"):
        Int8PointwiseConv2d.from_conv(nn.Conv2d(4, 4, kernel_size=3))


def test_patch_embedding_as_bf16_matmul_per_image():
    """A patchify convolution (a ViT's patch embedding) as one bf16 matmul per image: close
    to the float32 convolution per token, the same bits alone or in a batch, a
    channels-last output whose token rows are contiguous; convert_to_int8 swaps only such
    convolutions, and ``patch_conv="fp32"`` keeps them."""
    from vpr_ros.accel.int8_linear import GemmPatchEmbed
    from vpr_ros.accel.options import AccelOptions

    torch.manual_seed(6)
    conv = nn.Conv2d(3, 48, kernel_size=14, stride=14).eval()
    x = torch.randn(3, 3, 56, 42)
    layer = GemmPatchEmbed(conv)
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    assert y.shape == ref.shape == (3, 48, 4, 3)
    cos = nn.functional.cosine_similarity(y.permute(0, 2, 3, 1).reshape(-1, 48),
                                          ref.permute(0, 2, 3, 1).reshape(-1, 48), dim=1)
    assert cos.min() >= 0.9999, cos.min()
    assert torch.equal(layer(x[1:2]), y[1:2])
    assert y.flatten(2).transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="patch"):
        layer(torch.randn(1, 3, 50, 42))
    with pytest.raises(ValueError, match="patchify"):
        GemmPatchEmbed(nn.Conv2d(3, 8, kernel_size=3, stride=1))
    model = nn.Sequential(nn.Conv2d(3, 8, 14, 14), nn.Conv2d(8, 8, 3, 3, padding=1),
                          nn.Conv2d(8, 8, 1))
    convert_to_int8(model)
    assert isinstance(model[0], GemmPatchEmbed) and type(model[1]) is nn.Conv2d
    assert isinstance(model[2], Int8PointwiseConv2d)
    kept = convert_to_int8(nn.Sequential(nn.Conv2d(3, 8, 14, 14)),
                           options=AccelOptions(patch_conv="fp32"))
    assert type(kept[0]) is nn.Conv2d
    with pytest.raises(ValueError, match="patch_conv"):
        convert_to_int8(nn.Sequential(nn.Conv2d(3, 8, 14, 14)),
                        options=AccelOptions(patch_conv="int4"))


def test_convert_model_keeps_encoder_attention_and_folds_layer_scale():
    from vpr_ros.models.cards import load_card
    from vpr_ros.models.factory import load_model
    from timm.models.vision_transformer import Block

    model, _, _ = load_model(load_card("scicevpr_tiny_random"))
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert "encoder.layers.0.linear1" in linears
    x = torch.randn(2, 3, *load_card("scicevpr_tiny_random").input_size)
    with torch.no_grad():
        ref = model(x)
    convert_to_int8(model)
    assert count_int8_layers(model) == len(linears) + 1             # + the fusion conv
    assert isinstance(model.fusion, Int8PointwiseConv2d)
    # the region encoder's feed-forward layers convert; its attention, which reads its
    # projection weights directly (the teacher's cross-image path), stays float
    assert isinstance(model.encoder.layers[0].linear1, Int8Linear)
    assert type(model.encoder.layers[0].self_attn.out_proj) is not Int8Linear
    assert model.encoder.layers[0].self_attn.in_proj_weight.dtype == torch.float32
    blocks = [b for b in model.modules() if type(b) is Block]
    assert blocks and all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity)
                          for b in blocks)
    with torch.no_grad():
        out = model(x)
    assert nn.functional.cosine_similarity(out, ref).min() > 0.999
    with pytest.raises(ValueError, match="inside a model"):
        convert_to_int8(nn.Linear(4, 4))


def test_teacher_cross_image_encoder_runs_int8():
    """The teacher's encoder attends across the batch through ``nn.TransformerEncoder``
    (its attention reads the projection weights directly, so it stays float); its
    feed-forward layers run int8 and the descriptors stay close to fp32."""
    from vpr_ros.inference import GlobalDescriber

    rng = np.random.RandomState(0)
    images = [rng.randint(0, 255, (224, 224, 3), np.uint8) for _ in range(3)]
    ref = GlobalDescriber("demo_tiny_teacher", device="cpu", precision="fp32").describe(images)
    int8 = GlobalDescriber("demo_tiny_teacher", device="cpu", precision="int8")
    layer = next(m for m in int8.model.modules() if isinstance(m, nn.TransformerEncoderLayer))
    assert isinstance(layer.linear1, Int8Linear) and isinstance(layer.linear2, Int8Linear)
    assert np.sum(int8.describe(images) * ref, axis=1).min() >= 0.999


def test_batch_first_encoder_layers_stay_float():
    """torch's inference fast path of a ``batch_first`` TransformerEncoderLayer reads its
    feed-forward weights directly (an int8 layer has none): such a layer stays float
    whole and still runs; a ``batch_first=False`` layer's feed-forward converts."""
    torch.manual_seed(0)
    model = nn.Module()
    model.fast = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1,
        enable_nested_tensor=False)
    model.slow = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=False)
    model.eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model.fast(x)
    convert_to_int8(model)
    assert type(model.fast.layers[0].linear1) is nn.Linear
    assert isinstance(model.slow.linear1, Int8Linear)
    with torch.no_grad():
        assert torch.equal(model.fast(x), ref)
        assert model.slow(x.transpose(0, 1)).shape == (5, 2, 32)


def test_layer_scale_folding_matches_unfolded_block():
    from timm.models.vision_transformer import Block

    torch.manual_seed(6)
    block = Block(dim=32, num_heads=4, mlp_ratio=2.0, qkv_bias=True, init_values=1.0).eval()
    with torch.no_grad():
        block.ls1.gamma.uniform_(-2, 2)
        block.ls2.gamma.uniform_(0.1, 3)
    x = torch.randn(3, 20, 32)
    holder = nn.Sequential(block)
    convert_to_int8(holder, fold_layer_scales=False)
    with torch.no_grad():
        unfolded = block(x)
        assert fold_block_layer_scales(block)
        folded = block(x)
    assert isinstance(block.ls1, nn.Identity)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)
    assert isinstance(block.mlp.act, InplaceGELU)
    assert not fold_block_layer_scales(nn.Linear(3, 3))


def _kernels_with_vnni():
    from vpr_ros.accel.int8_kernels import native_kernels

    kernels = native_kernels(True)
    if kernels is None or not kernels.has_vnni:
        pytest.skip("the native int8 matmul needs the kernels built with AVX-512 VNNI")
    return kernels


@pytest.mark.parametrize("m,k,n", [(1, 4, 64), (3, 64, 64), (5, 128, 192), (6, 64, 128),
                                   (257, 768, 2304), (514, 1024, 512), (7, 6, 64), (9, 64, 96)])
def test_native_int8_matmul_is_the_exact_product(m, k, n):
    """The VNNI matmul (Int8Linear.integer_product) gives the exact int32 products, -128
    and every row count included; shapes it does not take (K % 4, N % 64) fall back to
    torch with the same integers."""
    from vpr_ros.accel.int8_kernels import pack_int8_weight

    kernels = _kernels_with_vnni()
    torch.manual_seed(m * 1000 + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    layer = Int8Linear(torch.randint(-128, 128, (k, n), dtype=torch.int8), torch.ones(n))
    exact = a.long() @ layer.weight_int8.long()
    native = layer.integer_product(a, kernels)
    assert native.dtype == torch.int32 and torch.equal(native.long(), exact)
    out = torch.full((m, n), 7, dtype=torch.int32)
    assert layer.integer_product(a, kernels, out) is out and torch.equal(out.long(), exact)
    assert (pack_int8_weight(layer.weight_int8) is None) == bool(k % 4 or n % 64)
    # the weight changed in place (as load_state_dict does): packed again
    with torch.no_grad():
        layer.weight_int8.mul_(-1)
    again = layer.integer_product(a, kernels)
    assert torch.equal(again.long(), a.long() @ layer.weight_int8.long())


# ----------------------------------------------------------------------------- describers

@pytest.fixture(scope="module")
def sample_images(sample_dir):
    from vpr_ros.preprocess import load_image

    files = sorted(sample_dir.rglob("*.jpg"))
    assert len(files) >= 40
    return [load_image(f) for f in files[::10][:4]]


@pytest.mark.parametrize("card", ["scicevpr_tiny_random", "demo_tiny"])
def test_int8_descriptors_bit_identical_alone_and_in_batch(card, sample_images):
    from vpr_ros.inference import GlobalDescriber

    d = GlobalDescriber(card, device="cpu", precision="int8", batch_size=3)
    assert count_int8_layers(d.model) > 0
    batch = d.describe(sample_images[:3])
    for i, image in enumerate(sample_images[:3]):
        alone = d.describe([image])[0]
        assert np.array_equal(alone, batch[i]), (card, i, np.abs(alone - batch[i]).max())
    # the same image next to different neighbours
    other = d.describe([sample_images[3], sample_images[3], sample_images[0]])
    assert np.array_equal(other[2], batch[0])


def test_native_int8_matmul_under_inference_mode_and_copies():
    """Layers built under torch.inference_mode (no version counter) take the native
    matmul; pickles and deep copies leave the packed weight out and pack again; a layer
    set to the float fallback (use_int_mm=False) runs it, not the native matmul."""
    import copy
    import pickle

    kernels = _kernels_with_vnni()
    a = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    with torch.inference_mode():
        layer = Int8Linear.from_linear(_linear(64, 128))
        exact = a.long() @ layer.weight_int8.long()
        assert torch.equal(layer.integer_product(a, kernels).long(), exact)
        assert layer.__dict__["_vnni"][2] is not None
    plain = Int8Linear.from_linear(_linear(64, 128))
    y = plain(torch.randn(3, 64))
    assert "_vnni" in plain.__dict__
    for other in (copy.deepcopy(plain), pickle.loads(pickle.dumps(plain))):
        assert "_vnni" not in other.__dict__
        x = torch.randn(3, 64)
        assert torch.equal(other(x), plain(x))
    del y
    from vpr_ros.accel.int8_kernels import pack_int8_weight

    packed = pack_int8_weight(plain.weight_int8)       # a packed weight on its own: its
    for again in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):  # own memory
        assert again.pointers != packed.pointers
        assert torch.equal(kernels.int8_gemm(a, again), kernels.int8_gemm(a, packed))
    fallback = Int8Linear.from_linear(_linear(64, 128))
    fallback.use_int_mm = False               # the float fallback: never packed, same integers
    assert torch.equal(fallback.integer_product(a, kernels).long(),
                       a.long() @ fallback.weight_int8.long())
    assert "_vnni" not in fallback.__dict__


def test_native_int8_matmul_same_bits_as_int_mm_in_a_model(sample_images):
    """demo_tiny's 21 int8 layers all take the VNNI matmul: descriptors bit-identical to
    torch._int_mm's."""
    from vpr_ros.accel.int8_kernels import pack_int8_weight
    from vpr_ros.inference import GlobalDescriber

    _kernels_with_vnni()
    d = GlobalDescriber("demo_tiny", device="cpu", precision="int8", batch_size=2)
    layers = [m for m in d.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(pack_int8_weight(m.weight_int8) is not None for m in layers)
    native = d.describe(sample_images[:3])
    try:
        Int8Linear.use_native_gemm = False
        int_mm = d.describe(sample_images[:3])
    finally:
        Int8Linear.use_native_gemm = True
    assert np.array_equal(native, int_mm)


def test_int8_selavpr_backbone_bit_identical_alone_and_in_batch(sample_images):
    """SelaVPR: the int8 backbone is bit-exact; its float32 GeM tail is not (as in fp32)."""
    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.preprocess import preprocess

    d = GlobalDescriber("selavpr_tiny_random", device="cpu", precision="int8", batch_size=3)
    x = preprocess(sample_images[:3], d.input_size)
    with torch.inference_mode():
        maps = d.model.backbone.forward_patch_map(x)
        alone = d.model.backbone.forward_patch_map(x[1:2])
    assert torch.equal(alone[0], maps[1])
    batch = d.describe(sample_images[:3])
    np.testing.assert_allclose(d.describe([sample_images[1]])[0], batch[1], atol=1e-6)


def test_int8_close_to_fp32_on_sample_images(sample_images):
    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor

    ref = GlobalDescriber("demo_tiny", device="cpu", precision="fp32").describe(sample_images)
    out = GlobalDescriber("demo_tiny", device="cpu", precision="int8").describe(sample_images)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.sum(out * ref, axis=1).min() >= 0.999

    ref_g, ref_l = LocalFeatureExtractor(None, device="cpu").extract(sample_images[:2])
    int8_extractor = LocalFeatureExtractor(None, device="cpu", precision="int8")
    g, local = int8_extractor.extract(sample_images[:2])
    assert np.sum(g * ref_g, axis=1).min() >= 0.999
    cos = np.sum(local.astype(np.float32) * ref_l.astype(np.float32), axis=-1)
    assert cos.mean() >= 0.999


def test_int8_needs_the_cpu():
    from vpr_ros.device import resolve_precision
    from vpr_ros.inference import GlobalDescriber

    with pytest.raises(DeviceError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(DeviceError):     # no CUDA here: the device itself is refused first
        GlobalDescriber("scicevpr_tiny_random", device="cuda", precision="int8")
    assert resolve_precision("int8", torch.device("cpu")) == torch.qint8


def test_int8_local_features_bit_identical_alone_and_in_batch(sample_images):
    """SelaVPR local features of the int8 model: the backbone gives an image the same bits
    alone or in a batch, and so do the LocalAdapt transposed convolutions (bf16 matmul +
    col2im per image) at this size."""
    from vpr_ros.accel.int8_linear import GemmConvTranspose2d
    from vpr_ros.inference import LocalFeatureExtractor
    from vpr_ros.preprocess import preprocess

    e = LocalFeatureExtractor(None, device="cpu", precision="int8", batch_size=3)
    assert sum(isinstance(m, GemmConvTranspose2d) for m in e.model.modules()) == 2
    x = preprocess(sample_images[:3], e.input_size)
    _, local = e.extract_tensor(x)
    _, alone = e.extract_tensor(x[1:2])
    assert torch.equal(alone[0], local[1])
