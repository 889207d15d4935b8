"""Native fused int8 kernels (vpr_ros.accel.int8_kernels, int8_block).

Checks: the kernels build with the machine's compiler into an atomic, reusable cache;
quantisation and dequantisation are bit-identical to the torch path; the fused GELU and
LayerNorm steps agree with torch's to float32 rounding; the integer attention computes
what it defines (int16 codes of Q, K, V and the softmax weights), the same bits with
AVX512-VNNI and with plain loops, image by image, without overflow, and stays close to
float32 SDPA, also with an attention sink; a fused ViT block matches the block it wraps,
never writes its input, returns fresh memory and is batch-invariant; and without a
compiler (or with the switch off) everything falls back to the torch path.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vpr_ros.accel import int8_kernels
from vpr_ros.accel.int8_block import (ENV_ATTENTION, IntegerAttention, Int8TransformerBlock,
                                      attention_fusable, fusable, fuse_transformer_blocks)
from vpr_ros.accel.convert import convert_to_int8
from vpr_ros.accel.int8_linear import Int8Linear, integer_matmul, quantize_rows


@pytest.fixture(scope="module")
def kernels():
    k = int8_kernels.native_kernels()
    assert k is not None, "this machine has a C compiler: the native kernels must build"
    return k


def _acc(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    q, s = quantize_rows(x)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    return integer_matmul(q, w), s, torch.rand(n, generator=g) * 1e-3, torch.randn(n, generator=g)


@pytest.mark.parametrize("m,k", [(1, 7), (5, 768), (257, 3072), (33, 100)])
def test_quantize_rows_bit_identical_to_torch(kernels, m, k):
    torch.manual_seed(m + k)
    x = torch.randn(m, k) * torch.logspace(-6, 3, m).unsqueeze(1)
    x[0, :] = 0.0                       # an all-zero row gets the tiny scale, codes 0
    q, s = kernels.quantize_rows(x)
    q_ref, s_ref = quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert int(q[0].abs().max()) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_dequantize_and_residual_add_bit_identical_to_torch(kernels, bias):
    acc, s, cs, b = _acc(70, 96, 136)
    b = b if bias else None
    ref = acc.float().mul_(s).mul_(cs)
    if b is not None:
        ref.add_(b)
    out = kernels.dequantize_(acc.clone(), s, cs, b)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    residual = torch.randn(70, 136)
    kept = residual.clone()
    added = kernels.dequantize_add_(acc.clone(), s, cs, b, residual)
    assert torch.equal(added, residual + ref)
    assert torch.equal(residual, kept)                  # the residual is only read


def test_gelu_and_layer_norm_steps_agree_with_torch(kernels):
    acc, s, cs, b = _acc(300, 64, 512, seed=3)
    q, qs = kernels.dequantize_gelu_quantize(acc.clone(), s, cs, b)
    h = nn.functional.gelu(acc.float().mul_(s).mul_(cs).add_(b))
    q_ref, qs_ref = quantize_rows(h)
    assert torch.allclose(qs, qs_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3

    torch.manual_seed(4)
    norm = nn.LayerNorm(200, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(50, 200) * 4 + 2
    q, qs = kernels.layer_norm_quantize(x, norm.weight.detach(), norm.bias.detach(), norm.eps)
    with torch.no_grad():
        q_ref, qs_ref = quantize_rows(norm(x))
    assert torch.allclose(qs, qs_ref, rtol=1e-5, atol=0)
    assert int((q.int() - q_ref.int()).abs().max()) <= 1
    # rows are independent of where they sit
    q2, qs2 = kernels.layer_norm_quantize(x[7:9].contiguous(), norm.weight.detach(),
                                          norm.bias.detach(), norm.eps)
    assert torch.equal(q2, q[7:9]) and torch.equal(qs2, qs[7:9])


def test_kernels_reject_wrong_inputs(kernels):
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        kernels.quantize_rows(torch.randn(4, 8).t())
    acc, s, cs, b = _acc(4, 8, 16)
    with pytest.raises(ValueError, match="expected 16 elements"):
        kernels.dequantize_(acc, s, cs[:8], b)
    with pytest.raises(ValueError, match="torch.int32"):
        kernels.dequantize_(acc.float(), s, cs, b)


def _attention_by_definition(qkv: torch.Tensor, b: int, n: int, h: int, d: int, scale: float):
    """What vpr_integer_attention computes, written with torch ops (integer products in float64,
    exact); and float32 SDPA of the same inputs."""
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    d_pad = -(-d // 16) * 16
    levels = min(32767.0, float(np.floor(np.sqrt(2147483647.0 / d_pad))))

    def per_token(x):                            # int16 codes with `levels` steps, per token
        amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        return torch.round(x * ((1 / amax) * levels)).double(), amax / levels

    q_codes, q_scale = per_token(q)
    k_codes, k_scale = per_token(k)
    k_scale = k_scale.transpose(-1, -2)
    scores = (q_codes @ k_codes.transpose(-1, -2)).float() * (q_scale * scale) * k_scale
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = torch.round(e * (32767 / e.sum(-1, keepdim=True)))
    v_max = v.abs().amax(-2, keepdim=True).clamp_min(1e-30)              # per channel of an image
    v_codes, v_scale = torch.round(v * ((1 / v_max) * 32767)), v_max / 32767
    sums = (weights.double() @ v_codes.double()).float()
    out = sums * v_scale * (1 / weights.sum(-1, keepdim=True))
    exact = nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return (out.transpose(1, 2).reshape(b * n, h * d), exact.transpose(1, 2).reshape(b * n, h * d))


@pytest.mark.parametrize("b,n,h,d", [(1, 257, 12, 64), (2, 37, 3, 16), (3, 50, 4, 20),
                                     (1, 5, 2, 6), (2, 1, 2, 8)])
def test_integer_attention_computes_its_definition_close_to_sdpa(kernels, b, n, h, d):
    g = torch.Generator().manual_seed(n * d)
    qkv = torch.randn(b * n, 3 * h * d, generator=g) * 2
    qkv[:, 2 * h * d:] += torch.randn(h * d, generator=g) * 3       # channels of different sizes
    out = kernels.integer_attention(qkv, b, n, h, d, d ** -0.5)
    defined, exact = _attention_by_definition(qkv, b, n, h, d, d ** -0.5)
    # only exp and the order of the weights' sum differ, which can move a weight code by
    # one step (1/32767 of a value)
    assert float((out - defined).abs().max()) <= 2 * float(qkv.abs().max()) / 32767
    assert float((out - defined).abs().mean()) < 1e-6
    cos = nn.functional.cosine_similarity(out.view(-1, d), exact.view(-1, d))
    assert float(cos.min()) > 0.99999
    # the plain-C loops (the path of CPUs without AVX512-VNNI) give the same bits
    assert torch.equal(kernels.integer_attention(qkv, b, n, h, d, d ** -0.5, generic=True), out)
    # every image on its own scales: alone or in a batch, the same bits
    for i in range(b):
        image = qkv[i * n:(i + 1) * n].contiguous()
        alone = kernels.integer_attention(image, 1, n, h, d, d ** -0.5)
        assert torch.equal(alone, out[i * n:(i + 1) * n])


def test_integer_attention_stays_accurate_with_an_attention_sink(kernels):
    """One key that takes much of every query's attention (logits of tens, as the high-norm
    tokens of real ViTs): the output stays within a fraction of a percent of SDPA's.
    (8-bit scores and weights, tried first, were off by 1% on average and 7% at worst.)"""
    b, n, h, d = 1, 257, 4, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b * n, 3 * h * d, generator=g)
    parts = qkv.view(n, 3, h, d)
    mean_query = parts[:, 0].mean(0)
    parts[0, 1] = mean_query / mean_query.norm(dim=-1, keepdim=True) * 40
    out = kernels.integer_attention(qkv, b, n, h, d, d ** -0.5)
    _, exact = _attention_by_definition(qkv, b, n, h, d, d ** -0.5)
    weights = torch.softmax(parts[:, 0].transpose(0, 1) @ parts[:, 1].permute(1, 2, 0) / 8, -1)
    assert float(weights[..., 0].max()) > 0.9                    # the sink dominates some rows
    err = (out - exact).view(n, h, d).norm(dim=-1) / exact.view(n, h, d).norm(dim=-1)
    assert float(err.mean()) < 0.003 and float(err.max()) < 0.01


def test_integer_attention_checks_its_buffers(kernels):
    qkv = torch.randn(10, 3 * 16)                          # 2 images x 5 tokens, 2 heads of 8
    with pytest.raises(ValueError, match="qkv: expected 960 elements"):
        kernels.integer_attention(qkv, 2, 5, 4, 8, 0.3)
    with pytest.raises(ValueError, match="out: expected 160 elements"):
        kernels.integer_attention(qkv, 2, 5, 2, 8, 0.3, out=torch.empty(5, 16))
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        kernels.integer_attention(qkv, 2, 5, 2, 8, 0.3, out=torch.empty(16, 10).t())
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        kernels.integer_attention(qkv.double(), 2, 5, 2, 8, 0.3)
    assert kernels.integer_attention(qkv, 2, 5, 2, 8, 0.3).shape == (10, 16)
    many = int8_kernels.MAX_ATTENTION_TOKENS + 1
    with pytest.raises(ValueError, match="at most 32767"):
        kernels.integer_attention(torch.zeros(many, 3), 1, many, 1, 1, 1.0)


@pytest.mark.parametrize("d", [8, 32, 64, 128])
def test_integer_attention_largest_codes_do_not_overflow(kernels, d):
    """Q and K at full scale in every channel make the largest possible integer scores
    (d * L^2); keys with one smaller channel score less, so a wrapped sum would show."""
    n, h = 20, 2
    qkv = torch.full((n, 3 * h * d), 3.0)
    parts = qkv.view(n, 3, h, d)
    parts[1::2, 1, :, 0] = 1.5                                    # odd keys: one smaller channel
    parts[::4, 0] = -3.0                                          # some queries of opposite sign
    parts[:, 2] = torch.linspace(-1, 1, n)[:, None, None]        # values differ per token
    out = kernels.integer_attention(qkv, 1, n, h, d, d ** -0.5)
    _, exact = _attention_by_definition(qkv, 1, n, h, d, d ** -0.5)
    assert torch.allclose(out, exact, atol=1e-3)


def _int8_block(dim: int = 64, heads: int = 4, seed: int = 0):
    from timm.models.vision_transformer import Block

    torch.manual_seed(seed)
    block = Block(dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True, init_values=0.5,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    holder = nn.Sequential(block)
    convert_to_int8(holder, fuse_blocks=False)
    return holder


def test_fused_block_matches_wrapped_block_and_keeps_memory_apart(kernels):
    holder = _int8_block()
    assert fusable(holder[0])
    assert fuse_transformer_blocks(holder) == 1
    fused = holder[0]
    assert isinstance(fused, Int8TransformerBlock)
    x = torch.randn(3, 50, 64)
    x_kept = x.clone()
    with torch.inference_mode():
        out = fused(x)
        ref = fused.block(x)                         # the same layers through torch ops
        first = out.clone()
        again = fused(torch.randn(3, 50, 64))          # reuses the workspace
    assert torch.equal(x, x_kept)                       # the input is never written
    assert torch.equal(out, first)                      # an earlier output is not overwritten
    assert again.data_ptr() != out.data_ptr()
    cos = nn.functional.cosine_similarity(out.reshape(-1, 64), ref.reshape(-1, 64))
    assert float(cos.min()) > 0.9999
    with torch.inference_mode():
        alone = fused(x[1:2])
    assert torch.equal(alone[0], out[1])                # batch-invariant, bit for bit


def test_fusable_refuses_what_it_cannot_reproduce():
    from timm.models.vision_transformer import Block

    plain = Block(dim=32, num_heads=4).eval()
    assert not fusable(plain)                           # float layers
    holder = _int8_block(dim=32)
    holder[0].mlp.act = nn.GELU(approximate="tanh")
    assert not fusable(holder[0])
    with pytest.raises(ValueError, match="fusable"):
        Int8TransformerBlock(plain)
    assert not fusable(nn.Linear(3, 3))


def test_cache_is_reused_and_written_atomically(tmp_path):
    first = int8_kernels.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert int8_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]     # no temporary left behind
    loaded = int8_kernels.NativeKernels(first)
    q, s = loaded.quantize_rows(torch.ones(2, 3))
    assert torch.equal(q, torch.full((2, 3), 127, dtype=torch.int8))


def test_without_compiler_or_switched_off_the_torch_path_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(int8_kernels.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(int8_kernels.KernelBuildError, match="no C compiler"):
        int8_kernels.build()
    with caplog.at_level(logging.WARNING, logger="vpr_ros.accel.int8_kernels"):
        assert int8_kernels.native_kernels() is None
    assert "torch path" in caplog.text

    from vpr_ros.inference import GlobalDescriber
    x = torch.rand(3, 3, 224, 224)
    d = GlobalDescriber("scicevpr_tiny_random", device="cpu", precision="int8")
    torch_path = d.describe_tensor(x)                   # no kernels for this cache folder
    assert torch.equal(d.describe_tensor(x[2:3])[0], torch_path[2])
    monkeypatch.delenv(int8_kernels.ENV_CACHE)
    monkeypatch.delenv("CC")
    native = d.describe_tensor(x)
    assert int8_kernels.native_kernels() is not None
    cos = nn.functional.cosine_similarity(native, torch_path)
    assert float(cos.min()) > 0.9999
    monkeypatch.setenv(int8_kernels.ENV_SWITCH, "0")
    assert int8_kernels.native_kernels() is None
    assert torch.equal(d.describe_tensor(x), torch_path)


def test_int8_linear_native_path_is_bit_identical(kernels, monkeypatch):
    torch.manual_seed(5)
    layer = Int8Linear.from_linear(nn.Linear(48, 40))
    x = torch.randn(2, 30, 48)
    native = layer(x)
    monkeypatch.setenv(int8_kernels.ENV_SWITCH, "off")
    assert torch.equal(layer(x), native)
    assert np.isfinite(native.numpy()).all()


def test_worker_thread_gives_the_same_bits(kernels):
    """The node describes on an executor thread: its own workspace, same descriptors."""
    import threading

    from vpr_ros.inference import GlobalDescriber

    d = GlobalDescriber("demo_tiny", device="cpu", precision="int8")
    x = torch.rand(2, 3, *d.input_size)
    main = d.describe_tensor(x)
    results = {}
    worker = threading.Thread(target=lambda: results.update(out=d.describe_tensor(x)))
    worker.start()
    worker.join(timeout=120)
    assert torch.equal(results["out"], main)


def test_layer_norm_scratch_is_the_threads_workspace(kernels):
    """The LayerNorm kernels' per-thread rows come from the one per-thread workspace the
    blocks use (no second owner): grown once, reused, and a separate set on another thread
    that gives the same bits."""
    import threading

    from vpr_ros.accel.workspace import WORKSPACE

    g = torch.Generator().manual_seed(14)
    x, w, b = torch.randn(9, 300, generator=g), torch.rand(300, generator=g), torch.randn(300)
    q, s = kernels.layer_norm_quantize(x, w, b, 1e-6)
    rows = WORKSPACE.buffers["layer_norm_rows"]
    assert rows.numel() >= torch.get_num_threads() * 300
    kernels.layer_norm_quantize(x[:, :200].contiguous(), w[:200], b[:200], 1e-6)
    assert WORKSPACE.buffers["layer_norm_rows"] is rows          # reused, not reallocated
    other = {}

    def work():
        other.update(out=kernels.layer_norm_quantize(x, w, b, 1e-6),
                     rows=WORKSPACE.buffers["layer_norm_rows"])

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert other["rows"] is not rows
    assert torch.equal(other["out"][0], q) and torch.equal(other["out"][1], s)


def test_integer_attention_switch_keeps_float_attention(kernels, monkeypatch):
    """VPR_ROS_INTEGER_ATTENTION=0: float32 SDPA inside the fused block, still batch-invariant."""
    from vpr_ros.inference import GlobalDescriber

    d = GlobalDescriber("scicevpr_tiny_random", device="cpu", precision="int8")
    x = torch.rand(3, 3, *d.input_size)
    with_int8 = d.describe_tensor(x)
    monkeypatch.setenv(ENV_ATTENTION, "0")
    with_float = d.describe_tensor(x)
    assert not torch.equal(with_float, with_int8)          # the switch reaches the blocks
    assert torch.equal(d.describe_tensor(x[1:2])[0], with_float[1])
    assert float(nn.functional.cosine_similarity(with_float, with_int8).min()) > 0.999
    monkeypatch.delenv(ENV_ATTENTION)
    assert torch.equal(d.describe_tensor(x), with_int8)


@pytest.mark.parametrize("bias,use_int_mm", [(True, True), (False, True), (True, False)])
def test_integer_attention_module_is_the_layer_by_layer_chain(kernels, bias, use_int_mm):
    """IntegerAttention runs the fused blocks' route (attention from the qkv layer's int32
    sums, its output quantised for proj in the kernel) with the bits of the layer-by-layer
    chain it replaced: int8 qkv layer, integer attention of the float qkv rows, int8 proj
    layer; the input is only read and the output is a fresh tensor."""
    from timm.models.vision_transformer import Attention

    torch.manual_seed(15)
    holder = nn.Sequential(Attention(64, num_heads=4, qkv_bias=bias).eval())
    convert_to_int8(holder)
    wrapped = holder[0]
    assert isinstance(wrapped, IntegerAttention)
    attn = wrapped.attn
    attn.qkv.use_int_mm = attn.proj.use_int_mm = use_int_mm
    x = torch.randn(3, 45, 64)
    kept = x.clone()
    with torch.inference_mode():
        got = wrapped(x)
        mixed = kernels.integer_attention(attn.qkv(x).reshape(3 * 45, 3 * 64), 3, 45,
                                          attn.num_heads, attn.head_dim, attn.scale)
        ref = attn.proj(mixed.view(3, 45, 64))
        again = wrapped(torch.randn(2, 45, 64))           # reuses the workspace
    assert torch.equal(got, ref)
    assert torch.equal(x, kept) and not torch.equal(again[0], got[0])


def test_attention_of_other_blocks_runs_int8(kernels, monkeypatch):
    """Attention of blocks that are not fusable as a whole gets the int8 attention: close to
    its own float32 SDPA, batch-invariant, switchable."""
    from timm.models.vision_transformer import Attention

    from vpr_ros.inference import LocalFeatureExtractor

    torch.manual_seed(3)
    holder = nn.Sequential(Attention(48, num_heads=4, qkv_bias=True).eval())
    convert_to_int8(holder, fuse_blocks=False)
    assert attention_fusable(holder[0]) and fuse_transformer_blocks(holder) == 1
    wrapped = holder[0]
    assert isinstance(wrapped, IntegerAttention)
    x = torch.randn(3, 40, 48)
    with torch.inference_mode():
        out = wrapped(x)
        ref = wrapped.attn(x)                            # float32 SDPA between int8 layers
        alone = wrapped(x[2:3])
    assert float(nn.functional.cosine_similarity(out.view(-1, 48), ref.view(-1, 48)).min()) > 0.99
    assert not torch.equal(out, ref)
    assert torch.equal(alone[0], out[2])
    monkeypatch.setenv(ENV_ATTENTION, "0")
    with torch.inference_mode():
        assert torch.equal(wrapped(x), ref)
    monkeypatch.delenv(ENV_ATTENTION)

    # SelaVPR's adapted blocks are now fused whole (Int8AdaptedBlock), attention included
    from vpr_ros.accel.int8_block import Int8AdaptedBlock

    extractor = LocalFeatureExtractor("selavpr_tiny_random", device="cpu", precision="int8")
    adapted = [m for m in extractor.model.modules() if isinstance(m, Int8AdaptedBlock)]
    assert len(adapted) == 4                             # one per adapted block of the tiny model


def _adapted_block(seed: int = 0, dim: int = 64, heads: int = 4, adapter_dim: int = 32):
    from vpr_ros.models.selavpr import AdaptedBlock

    torch.manual_seed(seed)
    block = AdaptedBlock(dim, heads, 4.0, adapter_dim=adapter_dim).eval()
    with torch.no_grad():
        for adapter in (block.adapter1, block.adapter2):      # trained adapters are not zero
            adapter.fc2.weight.normal_(0, 0.05)
            adapter.fc2.bias.normal_(0, 0.05)
        block.ls1.gamma.uniform_(0.5, 1.5)
        block.ls2.gamma.uniform_(0.5, 1.5)
    return block


def test_adapted_block_fused_close_and_batch_invariant(kernels):
    """SelaVPR's adapted blocks run fused (Int8AdaptedBlock): close to the unfused int8 block
    and to float32, and bit-identical alone or in a batch."""
    import copy

    from vpr_ros.accel.int8_block import Int8AdaptedBlock

    fp32 = _adapted_block()
    fused = nn.Sequential(copy.deepcopy(fp32))
    convert_to_int8(fused)
    assert isinstance(fused[0], Int8AdaptedBlock)
    unfused = nn.Sequential(copy.deepcopy(fp32))
    convert_to_int8(unfused, fuse_blocks=False)
    x = torch.randn(3, 37, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got, plain = fp32(x), fused(x), unfused(x)
        cos = F.cosine_similarity(got.reshape(-1, 64), ref.reshape(-1, 64)).min()
        assert cos >= 0.999, cos
        assert F.cosine_similarity(got.reshape(-1, 64), plain.reshape(-1, 64)).min() >= 0.9999
        alone = fused(x[1:2])
    assert torch.equal(alone[0], got[1])


@pytest.mark.parametrize("kind", ["plain", "adapted", "adapted_no_layer_scale"])
def test_whole_block_is_the_step_by_step_path(kernels, kind):
    """One parallel region per block (``vpr_block_chain`` with one block: the threads share
    out the rows, not the matmuls' columns) gives the bits of the same block run step by
    step: every row count modulo 4, fewer rows than threads, 1-3 threads, a
    non-contiguous input, LayerScale on and off.  The input is not written and every call
    returns a fresh tensor."""
    import copy

    from vpr_ros.accel.int8_block import Int8AdaptedBlock

    if not kernels.has_vnni:
        pytest.skip("the whole-block kernels need AVX-512 VNNI")
    if kind == "plain":
        holder = _int8_block()
        fuse_transformer_blocks(holder)
        assert isinstance(holder[0], Int8TransformerBlock)
    else:
        holder = nn.Sequential(copy.deepcopy(_adapted_block(seed=4, adapter_dim=64)))
        if kind == "adapted_no_layer_scale":
            holder[0].ls1 = nn.Identity()
            holder[0].ls2 = nn.Identity()
        convert_to_int8(holder)
        assert isinstance(holder[0], Int8AdaptedBlock)
    block = holder[0]
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            # rows b n: 1, 2, 3, 10, 16, 150 and 257 (every count modulo 4, fewer than
            # the threads)
            for b, n in [(1, 1), (1, 2), (1, 3), (2, 5), (2, 8), (3, 50), (1, 257)]:
                x = torch.randn(b, n, 64, generator=g)
                if n == 50:
                    x = torch.randn(b, 64, n, generator=g).transpose(1, 2)   # not contiguous
                kept = x.clone()
                with torch.no_grad():
                    block.whole = False
                    steps = block(x)
                    block.whole = True
                    block.__dict__.pop("_whole_block", None)
                    whole = block(x)
                    assert block.__dict__["_whole_block"][1] is not None   # it ran whole
                    again = block(x)
                assert torch.equal(whole, steps), (kind, t, b, n)
                assert torch.equal(x, kept) and again.data_ptr() != whole.data_ptr()
    finally:
        torch.set_num_threads(threads)
        block.whole = True
    # pickles and copies of a block that ran leave its cached C views (pointers) out
    import pickle

    for clone in (copy.deepcopy(holder), pickle.loads(pickle.dumps(holder))):
        assert "_whole_block" not in clone[0].__dict__
        with torch.no_grad():
            assert torch.equal(clone(x), holder(x))


def test_block_chain_is_the_block_by_block_path(kernels):
    """Consecutive fused blocks in one parallel region (``FusedBlockSequence.run`` ->
    ``vpr_block_chain``: the threads wake once per chain, spin barriers around each
    attention, block outputs in two work buffers used in turn) give the bits of the blocks
    run one by one: plain and adapted blocks mixed, a block that cannot join (``whole``
    off) splitting the chain, the kept outputs and the last one fresh tensors, 1-3
    threads, row counts below and above the thread count.  A model's ``BlockSequence``
    becomes a ``FusedBlockSequence`` when its blocks are fused."""
    import copy

    from vpr_ros.accel.int8_block import FusedBlockSequence
    from vpr_ros.models.dinov2 import BlockSequence

    if not kernels.has_vnni:
        pytest.skip("the block-chain kernel needs AVX-512 VNNI")
    torch.manual_seed(0)
    from timm.models.vision_transformer import Block

    parts = []
    for i in range(6):
        if i in (2, 4):
            parts.append(copy.deepcopy(_adapted_block(seed=10 + i, adapter_dim=64)))
        else:
            parts.append(Block(dim=64, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
                               init_values=0.5, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval())
    holder = nn.Module()
    holder.blocks = BlockSequence(parts)
    convert_to_int8(holder)
    assert type(holder.blocks) is FusedBlockSequence and len(holder.blocks) == 6
    assert [k for k, _ in holder.state_dict().items()][0].startswith("blocks.0.")
    blocks = list(holder.blocks)
    g = torch.Generator().manual_seed(8)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for b, n in [(1, 1), (1, 7), (2, 33), (1, 257)]:
                x = torch.randn(b, n, 64, generator=g)
                kept_in = x.clone()
                with torch.no_grad():
                    one_by_one, outs = x, []
                    for block in blocks:
                        one_by_one = block(one_by_one)
                        outs.append(one_by_one)
                    for off in ((), (3,)):          # block 3 alone splits the chain
                        for i in off:
                            blocks[i].whole = False
                        last, kept = holder.blocks.run(x, 6, (1, 2, 4))
                        for i in off:
                            blocks[i].whole = True
                        assert torch.equal(last, outs[5]), (t, b, n, off)
                        assert all(torch.equal(k, outs[i]) for k, i in zip(kept, (1, 2, 4)))
                        again, kept2 = holder.blocks.run(x, 6, (1, 2, 4))
                        assert again.data_ptr() != last.data_ptr()
                        assert all(a.data_ptr() != k.data_ptr() for a, k in zip(kept, kept2))
                        assert torch.equal(holder.blocks.run(x, 3)[0], outs[2])
                assert torch.equal(x, kept_in)
    finally:
        torch.set_num_threads(threads)


def test_block_chain_call_follows_replaced_layer_scales_and_adapter_scale(kernels):
    """The cached C call of an adapted block points at its LayerScales and holds its
    adapter factor: replacing either after a run must be seen (the call is rebuilt), never
    read through a stale pointer."""
    import copy

    if not kernels.has_vnni:
        pytest.skip("the block-chain kernel needs AVX-512 VNNI")
    holder = nn.Sequential(copy.deepcopy(_adapted_block(seed=4, adapter_dim=64)))
    convert_to_int8(holder)
    block = holder[0]
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(9))

    def both():
        with torch.no_grad():
            whole = block(x)
            block.whole = False
            steps = block(x)
            block.whole = True
        return whole, steps

    first, _ = both()
    block.block.ls1.gamma = nn.Parameter(block.block.ls1.gamma.detach() * 2.0)
    whole, steps = both()
    assert torch.equal(whole, steps) and not torch.equal(whole, first)
    block.block.adapter_scale = block.block.adapter_scale * 3.0
    again, steps = both()
    assert torch.equal(again, steps) and not torch.equal(again, whole)


def test_kernels_build_without_vnni_and_give_the_same_bits(kernels, tmp_path, monkeypatch):
    """CPUs without AVX-512 VNNI (a robot's ARM board, most x86 laptops) build the plain-C
    kernels: the source must compile without the vector code (every function the bindings
    declare defined, every type they use visible), load, and give int8 ViT blocks (plain
    and adapted, in a block sequence) the bits of this machine's VNNI build."""
    import copy
    import platform
    import subprocess

    from vpr_ros.accel import int8_block
    from vpr_ros.models.dinov2 import BlockSequence

    flags = [*int8_kernels.BASE_FLAGS, "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mno-avx512f")               # no AVX-512 at all, whatever the default
    out = tmp_path / "plain_kernels.so"
    proc = subprocess.run([int8_kernels._compiler(), *flags, "-o", str(out),
                           str(int8_kernels.SOURCE), "-lm"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = int8_kernels.NativeKernels(out)
    assert not plain.has_vnni

    torch.manual_seed(0)
    holder = nn.Module()
    holder.blocks = BlockSequence([_int8_block(seed=3)[0],
                                   copy.deepcopy(_adapted_block(seed=4, adapter_dim=64))])
    convert_to_int8(holder)
    assert type(holder.blocks) is int8_block.FusedBlockSequence
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = holder.blocks.run(x, 2)[0]                 # this machine's kernels
        monkeypatch.setattr(int8_block, "native_kernels", lambda *a, **k: plain)
        got = holder.blocks.run(x, 2)[0]
    assert torch.equal(got, ref)


def test_whole_block_over_several_matmul_chunks(kernels):
    """At 512 channels (hidden 2048) the matmul's rows run in two chunks per thread with
    one thread (the 512 KB chunks of a 257 x 2048 input), the one-row tile in the last:
    still the step-by-step path's bits."""
    if not kernels.has_vnni:
        pytest.skip("the whole-block kernels need AVX-512 VNNI")
    holder = _int8_block(dim=512, heads=8, seed=2)
    fuse_transformer_blocks(holder)
    block = holder[0]
    x = torch.randn(1, 257, 512, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.no_grad():
                block.whole = False
                steps = block(x)
                block.whole = True
                whole = block(x)
            assert torch.equal(whole, steps), t
    finally:
        torch.set_num_threads(threads)
        block.whole = True
    assert block.__dict__["_whole_block"][1] is not None


def test_whole_block_follows_the_integer_attention_switch(kernels):
    """With the integer attention off the block runs float32 SDPA step by step: the
    whole-block kernel (integer attention only) must not take it."""
    from vpr_ros.accel.options import AccelOptions

    if not kernels.has_vnni:
        pytest.skip("the whole-block kernels need AVX-512 VNNI")
    holder = _int8_block(seed=6)
    fuse_transformer_blocks(holder)
    block = holder[0]
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        integer = block(x)
        block.accel = AccelOptions(integer_attention=False)
        sdpa = block(x)
        block.whole = False
        sdpa_steps = block(x)
    assert torch.equal(sdpa, sdpa_steps) and not torch.equal(sdpa, integer)


def test_whole_block_falls_back_to_the_steps_where_a_layer_cannot_be_packed(kernels):
    """An adapter of 32 channels is not a multiple of the matmul's 64 columns: the block
    runs step by step (same result either way) instead of the whole-block kernel."""
    holder = nn.Sequential(_adapted_block(seed=4))
    convert_to_int8(holder)
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        whole = holder(x)
        holder[0].whole = False
        steps = holder(x)
    assert torch.equal(whole, steps)
    assert "_whole_block" not in holder[0].__dict__


def test_adapters_of_two_widths_are_not_fused():
    """The fused adapted block shares one work buffer between its two adapters: a block
    whose adapters differ in width is left to its own layers (which compute it right)."""
    import copy

    from vpr_ros.accel.int8_block import Int8AdaptedBlock, adapted_fusable
    from vpr_ros.models.selavpr import Adapter

    fp32 = _adapted_block(seed=8, adapter_dim=64)
    fp32.adapter2 = Adapter(64, 192, skip=False)
    holder = nn.Sequential(copy.deepcopy(fp32))
    convert_to_int8(holder)
    assert not adapted_fusable(holder[0]) and not isinstance(holder[0], Int8AdaptedBlock)
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cos = F.cosine_similarity(holder(x).reshape(-1, 64), fp32(x).reshape(-1, 64)).min()
    assert cos >= 0.999, cos


# -- fused block steps (residual + LayerScale + LayerNorm, ReLU, MLP + adapter) -----------

@pytest.mark.parametrize("skip,gamma", [(False, False), (True, True), (True, False),
                                        (False, True)])
def test_residual_layer_norm_quantize_is_the_unfused_chain(kernels, skip, gamma):
    """Bit for bit: dequantise (+ skip) (* gamma) + residual, then LayerNorm + quantise, as
    the separate kernels and torch ops compute them; the row scales may be the output
    scales (read before written), the residual and skip are only read."""
    acc, s, cs, b = _acc(61, 48, 200, seed=5)
    g = torch.Generator().manual_seed(6)
    residual, skip_t = torch.randn(61, 200, generator=g), torch.randn(61, 200, generator=g)
    gamma_t = torch.rand(200, generator=g) + 0.5
    ln = (torch.rand(200, generator=g) + 0.5, torch.randn(200, generator=g), 1e-6)
    kept = (residual.clone(), skip_t.clone())

    ref = kernels.dequantize_(acc.clone(), s, cs, b)
    if skip:
        ref = ref + skip_t
    if gamma:
        ref = ref * gamma_t
    ref = residual + ref
    scale = s.clone()                      # aliased: the input row scales become the output's
    q = torch.empty(61, 200, dtype=torch.int8)
    out = kernels.residual_layer_norm_quantize(
        acc.clone(), scale, cs, b, residual, ln, skip=skip_t if skip else None,
        gamma=gamma_t if gamma else None, q=q, scale=scale)
    assert torch.equal(out, ref)
    q_ref, s_ref = kernels.layer_norm_quantize(ref, *ln)
    assert torch.equal(q, q_ref) and torch.equal(scale, s_ref)
    assert torch.equal(residual, kept[0]) and torch.equal(skip_t, kept[1])


@pytest.mark.parametrize("relu", [True, False])
def test_dequantize_quantize_is_the_unfused_chain(kernels, relu):
    acc, s, cs, b = _acc(45, 64, 130, seed=7)
    ref = kernels.dequantize_(acc.clone(), s, cs, b)
    if relu:
        torch.relu_(ref)
    q_ref, s_ref = kernels.quantize_rows(ref)
    h, q, scale = kernels.dequantize_quantize(acc.clone(), s, cs, b, relu)
    assert torch.equal(h, ref) and torch.equal(q, q_ref) and torch.equal(scale, s_ref)
    if relu:
        assert float(h.min()) >= 0.0


def test_dequantize_pair_residual_is_the_mlp_and_adapter_sum(kernels):
    acc, s, cs, b = _acc(33, 64, 96, seed=8)
    side, s2, cs2, b2 = _acc(33, 40, 96, seed=9)
    g = torch.Generator().manual_seed(10)
    residual, gamma = torch.randn(33, 96, generator=g), torch.rand(96, generator=g) + 0.5
    mlp = kernels.dequantize_(acc.clone(), s, cs, b)
    adapter = kernels.dequantize_(side.clone(), s2, cs2, b2)
    for gam in (gamma, None):
        ref = mlp + 0.2 * adapter
        ref = residual + (ref * gam if gam is not None else ref)
        out = kernels.dequantize_pair_residual(acc.clone(), side.clone(), (s, cs, b),
                                               (s2, cs2, b2), 0.2, gam, residual)
        # mlp + 0.2 * adapter is one fused multiply-add in the kernel (as torch's add with
        # alpha): within one float32 rounding of the two-step form
        assert torch.allclose(out, ref, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="side"):
        kernels.dequantize_pair_residual(acc.clone(), side[:5].clone(), (s, cs, b),
                                         (s2, cs2, b2), 0.2, None, residual)


def test_adapted_block_fused_is_the_unfused_int8_chain(kernels):
    """With the integer attention in both, the fused adapted block gives the bits of the same
    block computed step by step with the separate kernels and torch ops."""
    import copy

    from vpr_ros.accel.int8_block import WORKSPACE, Int8AdaptedBlock, _layer_scale

    fp32 = _adapted_block(seed=3)
    fused = nn.Sequential(copy.deepcopy(fp32))
    convert_to_int8(fused)
    assert isinstance(fused[0], Int8AdaptedBlock)
    blk = fused[0].block
    x = torch.randn(2, 29, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = fused(x)
        # the chain by hand: Int8Linear layers (native path: same bits as the kernels)
        rows = x.reshape(-1, 64)
        h, hs = kernels.layer_norm_quantize(rows, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = kernels.dequantize_(integer_matmul(h, blk.attn.qkv.weight_int8), hs,
                                  blk.attn.qkv.weight_scale, blk.attn.qkv.bias)
        mixed = kernels.integer_attention(qkv, 2, 29, blk.attn.num_heads, blk.attn.head_dim,
                                          blk.attn.scale)
        a = blk.attn.proj(mixed)
        t = blk.adapter1.fc2(torch.relu(blk.adapter1.fc1(a))) + a
        x1 = rows + t * _layer_scale(blk.ls1)
        h2 = blk.norm2(x1)
        side = blk.adapter2.fc2(torch.relu(blk.adapter2.fc1(h2)))
        mlp = blk.mlp.fc2(F.gelu(blk.mlp.fc1(h2)))
        ref = x1 + (mlp + blk.adapter_scale * side) * _layer_scale(blk.ls2)
    cos = F.cosine_similarity(got.reshape(-1, 64), ref, dim=1).min()
    # the hand chain's norm2 is torch's LayerNorm and its GELU torch's (the kernels differ
    # by float32 rounding): close, not equal
    assert cos >= 0.99999, cos
    assert WORKSPACE.buffers                         # the block ran through the kernels


@pytest.mark.parametrize("compute", ["bf16", "int8"])
def test_gemm_conv_transpose_close_shapes_and_batch_invariant(compute):
    """A transposed convolution as matmul + col2im: the float layer's output shape (odd
    strides, output padding, dilation, no bias), close to it per pixel, and with int8 an
    image's output is the same alone or in a batch."""
    from vpr_ros.accel.int8_linear import GemmConvTranspose2d

    torch.manual_seed(11)
    cases = [dict(kernel_size=3, stride=2, padding=1),                       # LocalAdapt
             dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)),
             dict(kernel_size=3, stride=1, padding=2, dilation=2, bias=False)]
    for kw in cases:
        conv = nn.ConvTranspose2d(48, 24, **kw).eval()
        q = GemmConvTranspose2d(conv, compute)
        x = torch.randn(3, 48, 9, 7)
        with torch.no_grad():
            ref, got = conv(x), q(x)
            alone = q(x[2:3])
        assert got.shape == ref.shape, (kw, got.shape, ref.shape)
        cos = F.cosine_similarity(got.permute(0, 2, 3, 1).reshape(-1, 24),
                                  ref.permute(0, 2, 3, 1).reshape(-1, 24), dim=1)
        assert cos.min() >= (0.9999 if compute == "bf16" else 0.999), (kw, cos.min())
        if compute == "int8":
            assert torch.equal(alone[0], got[2])
        else:
            assert torch.allclose(alone[0], got[2], rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="compute"):
        GemmConvTranspose2d(nn.ConvTranspose2d(4, 4, 3), "fp8")


@pytest.mark.parametrize("compute", ["bf16", "int8"])
def test_gemm_conv_transpose_native_col2im_is_the_fold(kernels, compute):
    """The native channels-last col2im gives the bits of ``F.fold`` (the path without the
    kernels) on every layer shape of the test above, and a channels-last output."""
    from vpr_ros.accel.int8_linear import GemmConvTranspose2d
    from vpr_ros.accel.options import AccelOptions

    torch.manual_seed(12)
    for kw in [dict(kernel_size=3, stride=2, padding=1),
               dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)),
               dict(kernel_size=3, stride=1, padding=2, dilation=2, bias=False)]:
        q = GemmConvTranspose2d(nn.ConvTranspose2d(48, 24, **kw).eval(), compute)
        x = torch.randn(2, 48, 9, 7)
        with torch.no_grad():
            native = q(x)
            q.accel = AccelOptions(native_kernels=False)
            fold = q(x)
        assert native.is_contiguous(memory_format=torch.channels_last), kw
        assert torch.equal(native, fold), (kw, (native - fold).abs().max())


def test_col2im_kernel_height_limit_is_one_value(kernels):
    """The kernel height limit comes from the C source alone: the wrapper refuses a taller
    kernel, and the layer sends one to ``F.fold`` (same bits as the layer without the
    native kernels), while the tallest kernel taken still runs natively."""
    from vpr_ros.accel.int8_linear import GemmConvTranspose2d
    from vpr_ros.accel.options import AccelOptions

    limit = kernels.col2im_max_kernel_height
    assert limit == 64
    cols = torch.zeros(1, 1, (limit + 1) * 1 * 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel height"):
        kernels.col2im_channels_last(cols, (1, 1, 1, 2), (limit + 1, 1), (1, 1), (0, 0),
                                     (1, 1), (limit + 1, 1), None)
    torch.manual_seed(13)
    for kh in (limit, limit + 1):
        q = GemmConvTranspose2d(nn.ConvTranspose2d(4, 3, (kh, 2), stride=(2, 1)).eval(), "bf16")
        x = torch.randn(2, 4, 3, 5)
        with torch.no_grad():
            got = q(x)
            q.accel = AccelOptions(native_kernels=False)
            fold = q(x)
        assert torch.equal(got, fold), kh
        # channels last only where the native col2im ran
        assert got.is_contiguous(memory_format=torch.channels_last) == (kh <= limit), kh


def test_convert_swaps_plain_conv_transposes_only():
    from vpr_ros.accel.int8_linear import GemmConvTranspose2d
    from vpr_ros.accel.options import AccelOptions

    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, 2, 1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 4, 3, 2, 1, groups=2))
    convert_to_int8(model)
    assert isinstance(model[0], GemmConvTranspose2d) and model[0].compute == "bf16"
    assert type(model[2]) is nn.ConvTranspose2d               # grouped: left in float32
    other = convert_to_int8(nn.Sequential(nn.ConvTranspose2d(8, 4, 3, 2, 1)),
                            options=AccelOptions(conv_transpose="int8"))
    assert other[0].compute == "int8" and isinstance(other[0].linear, Int8Linear)


@pytest.mark.parametrize("b,n,h,d,bias", [(1, 257, 12, 64, True), (2, 37, 4, 16, False),
                                          (3, 5, 2, 24, True)])
def test_integer_attention_from_int32_sums_is_dequantise_then_attention(
        kernels, b, n, h, d, bias):
    acc, s, cs, bi = _acc(b * n, 40, 3 * h * d, seed=n)
    bi = bi if bias else None
    kept = acc.clone()
    for generic in (False, True):
        ref = kernels.integer_attention(kernels.dequantize_(acc.clone(), s, cs, bi), b, n, h, d,
                                        0.125, generic=generic)
        got = kernels.integer_attention_acc(acc, s, cs, bi, b, n, h, d, 0.125, generic=generic)
        assert torch.equal(got, ref)
        # with the output's int8 codes in the same region, into the row scales it read
        # (as the fused blocks call it): the bits of quantize_rows on the output
        q, scale = torch.empty(b * n, h * d, dtype=torch.int8), s.clone()
        got = kernels.integer_attention_acc(acc, scale, cs, bi, b, n, h, d, 0.125,
                                            generic=generic, quantized=(q, scale))
        q_ref, scale_ref = kernels.quantize_rows(ref)
        assert torch.equal(got, ref) and torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(acc, kept)                     # the sums are only read
