"""The acceleration layer's switches are explicit options (API argument, CLI flag); the
environment variables are only overrides of unset options; the layer has no import
cycle and the model code imports none of it."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from vpr_ros.accel.options import ENV_OVERRIDES, AccelOptions
from vpr_ros.cli.common import accel_from_args, add_model_args
from vpr_ros.inference import GlobalDescriber


def _flags(*argv):
    parser = argparse.ArgumentParser()
    add_model_args(parser, local=True)
    return accel_from_args(parser.parse_args(list(argv)))


def test_cli_flags_become_options():
    assert _flags() == AccelOptions()
    opts = _flags("--native-kernels", "off", "--integer-attention", "on", "--kernel-cache", "/k")
    assert opts == AccelOptions(native_kernels=False, integer_attention=True, kernel_cache="/k")
    with pytest.raises(SystemExit):
        _flags("--native-kernels", "maybe")


def test_unset_options_take_the_override_explicit_ones_win(monkeypatch):
    monkeypatch.setenv("VPR_ROS_NATIVE_KERNELS", "0")
    monkeypatch.setenv("VPR_ROS_INTEGER_ATTENTION", "off")
    assert not AccelOptions().use_native_kernels()
    assert not AccelOptions().use_integer_attention()
    assert AccelOptions(native_kernels=True, integer_attention=True).use_native_kernels()
    assert AccelOptions(integer_attention=True).use_integer_attention()
    monkeypatch.delenv("VPR_ROS_NATIVE_KERNELS")
    assert AccelOptions().use_native_kernels()
    assert set(ENV_OVERRIDES) >= {"VPR_ROS_NATIVE_KERNELS", "VPR_ROS_INTEGER_ATTENTION",
                                  "VPR_ROS_KERNEL_CACHE"}


def test_describer_options_equal_the_overrides(monkeypatch):
    """accel=AccelOptions(...) switches exactly what the environment overrides switch."""
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    off = GlobalDescriber("demo_tiny", device="cpu", precision="int8",
                          accel=AccelOptions(native_kernels=False))
    sdpa = GlobalDescriber("demo_tiny", device="cpu", precision="int8",
                           accel=AccelOptions(integer_attention=False))
    x = x[..., :off.input_size[0], :off.input_size[1]].contiguous()
    by_option = (off.describe_tensor(x), sdpa.describe_tensor(x))
    plain = GlobalDescriber("demo_tiny", device="cpu", precision="int8")
    default = plain.describe_tensor(x)
    monkeypatch.setenv("VPR_ROS_NATIVE_KERNELS", "0")
    assert torch.equal(plain.describe_tensor(x), by_option[0])
    monkeypatch.setenv("VPR_ROS_NATIVE_KERNELS", "1")
    monkeypatch.setenv("VPR_ROS_INTEGER_ATTENTION", "0")
    assert torch.equal(plain.describe_tensor(x), by_option[1])
    # an explicit option is not overridden
    assert torch.equal(GlobalDescriber("demo_tiny", device="cpu", precision="int8",
                                       accel=AccelOptions(integer_attention=True))
                       .describe_tensor(x), default)


def _modules_after(statement: str) -> str:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout


def test_no_import_cycle_and_models_do_not_need_accel():
    mods = _modules_after("import vpr_ros.accel.int8_linear").split()
    assert "vpr_ros.accel.int8_block" not in mods and "vpr_ros.accel.convert" not in mods
    mods = _modules_after("import vpr_ros.models.scicevpr, vpr_ros.models.selavpr, "
                          "vpr_ros.models.rerank, vpr_ros.models.factory").split()
    assert not [m for m in mods if m.startswith("vpr_ros.accel")]


def test_conv_transpose_and_patch_conv_are_options_end_to_end():
    """--conv-transpose / --patch-conv reach AccelOptions, and the options reach the layers
    the describers build (SelaVPR's LocalAdapt, the patch embedding); bad values are
    refused where the options are made."""
    from vpr_ros.accel.int8_linear import GemmConvTranspose2d, GemmPatchEmbed
    from vpr_ros.inference import LocalFeatureExtractor

    opts = _flags("--conv-transpose", "int8", "--patch-conv", "fp32")
    assert opts == AccelOptions(conv_transpose="int8", patch_conv="fp32")
    assert _flags().conv_transpose == "bf16" and _flags().patch_conv == "bf16"
    with pytest.raises(SystemExit):
        _flags("--patch-conv", "int8")
    with pytest.raises(ValueError, match="conv_transpose"):
        AccelOptions(conv_transpose="fp8")

    def layers(extractor, kind):
        return [m for m in extractor.model.modules() if isinstance(m, kind)]

    default = LocalFeatureExtractor("selavpr_tiny_random", device="cpu", precision="int8")
    chosen = LocalFeatureExtractor("selavpr_tiny_random", device="cpu", precision="int8",
                                   accel=opts)
    assert {m.compute for m in layers(default, GemmConvTranspose2d)} == {"bf16"}
    assert {m.compute for m in layers(chosen, GemmConvTranspose2d)} == {"int8"}
    assert layers(default, GemmPatchEmbed) and not layers(chosen, GemmPatchEmbed)
    # every layer class that declares options got these (layers, fused blocks, attention)
    declaring = [m for m in chosen.model.modules()
                 if isinstance(getattr(type(m), "accel", None), AccelOptions)]
    assert len({type(m) for m in declaring}) >= 3 and all(m.accel is opts for m in declaring)
    x = torch.rand(1, 3, *default.input_size, generator=torch.Generator().manual_seed(1))
    a, b = default.extract_tensor(x)[1], chosen.extract_tensor(x)[1]     # local features
    assert not torch.equal(a, b)                      # the choice changes the computation
    assert float(torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]),
                                                       b.reshape(-1, b.shape[-1])).min()) > 0.99
