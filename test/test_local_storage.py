"""int8 local-feature storage: quantisation, memory-mapped maps, re-ranking on them.

Real tiny SelaVPR model on real sample images, real map folders and the real re-ranking;
the effect of int8 on counts at SelaVPR ViT-L size is measured in benchmarks/bench_rerank.py.
"""

import json

import numpy as np
import pytest
import torch

from vpr_ros.errors import MapError
from vpr_ros.inference import LocalFeatureExtractor
from vpr_ros.localizer import Localizer
from vpr_ros.maps import PlaceMap, add_to_map, build_map
from vpr_ros.maps.local_store import (Int8LocalFeatures, PlaceSubset, check_local_storage,
                                      dequantize_int8, quantize_int8)
from vpr_ros.models.rerank import mutual_nn_counts

N = 8


@pytest.fixture(scope="module")
def local():
    return LocalFeatureExtractor("selavpr_tiny_random", device="cpu")


@pytest.fixture(scope="module")
def db(sample_database):
    return sample_database


@pytest.fixture(scope="module")
def maps(tmp_path_factory, describer, local, db):
    root = tmp_path_factory.mktemp("storage")
    for storage in ("float16", "int8"):
        build_map(db[:N], root / storage, describer, local_extractor=local, progress=False,
                  local_storage=storage)
    return root


def test_quantisation_error_is_bounded_per_point():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7, 128)).astype(np.float32) * rng.uniform(0.01, 3, (5, 7, 1))
    x[0, 0] = 0.0                                        # an all-zero point survives
    codes, scales = quantize_int8(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == (5, 7)
    assert np.abs(codes).max() <= 127
    back = dequantize_int8(codes, scales)
    err = np.abs(back - x).max(axis=-1)
    assert (err <= scales.astype(np.float32) * 0.5 + 1e-3 * np.abs(x).max(axis=-1)).all()
    assert (back[0, 0] == 0).all()
    # re-quantising stored values gives the same codes and scales (add_to_map copies raw)
    codes2, scales2 = quantize_int8(back)
    np.testing.assert_array_equal(codes2, codes)
    np.testing.assert_array_equal(scales2, scales)
    with pytest.raises(MapError, match="NaN"):
        quantize_int8(np.full((2, 4), np.nan, np.float32))
    with pytest.raises(MapError, match="unknown local feature storage"):
        check_local_storage("int4")


def test_int8_map_is_half_the_size_memory_mapped_and_reranks_like_float16(maps, describer,
                                                                          local, db):
    f16 = PlaceMap.open_for(maps / "float16", describer, local_extractor=local)
    i8 = PlaceMap.open_for(maps / "int8", describer, local_extractor=local)
    assert isinstance(i8.local_features, Int8LocalFeatures)
    assert isinstance(i8.local_features.codes, np.memmap)
    assert isinstance(i8.local_features.scales, np.memmap)
    assert i8.local_features.shape == f16.local_features.shape == (N, 61, 61, 16)
    lf8 = i8.manifest["local_features"]
    lf16 = f16.manifest["local_features"]
    assert lf8["storage"] == "int8" and lf16["storage"] == "float16"
    assert lf8["scales_file"] == "local_scales.npy" and "local_scales.npy" in i8.manifest["files"]
    # 61*61*16 codes + 61*61 float16 scales vs 61*61*16 float16 values
    assert lf8["bytes_per_place"] == 61 * 61 * 16 + 61 * 61 * 2
    assert lf16["bytes_per_place"] == 61 * 61 * 16 * 2
    # at SelaVPR ViT-L width (C=128) the same layout is 0.48 MB per place (target <= 0.5 MB)
    assert (61 * 61 * 128 + 61 * 61 * 2) / 2 ** 20 <= 0.5
    # dequantised features are close to the float16 ones
    a = np.asarray(f16.local_features[3], np.float32)
    b = i8.local_features[3]
    assert b.dtype == np.float32 and b.shape == (61, 61, 16)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    assert cos.min() > 0.995
    # the re-ranked top-1 is the same place on both maps
    for i in (1, 6):
        img = db[i].load()
        r16 = Localizer(f16, describer, local_extractor=local, top_k=4, rerank_k=4).localize(img)
        r8 = Localizer(i8, describer, local_extractor=local, top_k=4, rerank_k=4).localize(img)
        assert r16.reranked and r8.reranked
        assert r16.place_index == r8.place_index == i


def test_counts_on_int8_storage_equal_counts_on_its_dequantised_values(maps, describer, local):
    i8 = PlaceMap.open_for(maps / "int8", describer, local_extractor=local)
    store = i8.local_features
    query = torch.from_numpy(store[0])
    lazy = mutual_nn_counts(query, PlaceSubset(store, range(N)))
    dense = mutual_nn_counts(query, torch.from_numpy(store[np.arange(N)]))
    assert torch.equal(lazy, dense)
    # unit-length features come back unit length, so every point of a place matches its
    # own copy: without that, quantisation noise in the norms let neighbours out-score it
    assert i8.manifest["local_features"]["unit_norm"] is True
    assert int(lazy[0]) == 61 * 61


def test_add_to_int8_map_keeps_int8_and_copies_old_codes(tmp_path, maps, describer, local, db):
    import shutil
    target = tmp_path / "grow"
    shutil.copytree(maps / "int8", target)
    before = PlaceMap.open(target).local_features
    old_codes = np.array(before.codes)
    add_to_map(target, db[N:N + 3], describer, local_extractor=local, progress=False)
    after = PlaceMap.open_for(target, describer, local_extractor=local)
    assert isinstance(after.local_features, Int8LocalFeatures)
    assert len(after.local_features) == N + 3
    np.testing.assert_array_equal(np.asarray(after.local_features.codes[:N]), old_codes)
    assert after.manifest["local_features"]["storage"] == "int8"


def test_broken_int8_storage_is_named(tmp_path, maps):
    import shutil
    target = tmp_path / "broken"
    shutil.copytree(maps / "int8", target)
    (target / "local_scales.npy").unlink()
    with pytest.raises(MapError, match="local_scales.npy"):
        PlaceMap.open(target)
    # a manifest that claims int8 over a float16 file is refused with the reason
    target2 = tmp_path / "claims"
    shutil.copytree(maps / "float16", target2)
    m = json.loads((target2 / "manifest.json").read_text())
    m["local_features"]["storage"] = "int8"
    (target2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MapError):
        PlaceMap.open(target2, verify="none")


def test_cli_build_with_int8_local_storage(tmp_path, sample_dir, capsys):
    from vpr_ros.cli.main import main

    out = tmp_path / "m"
    rc = main(["map", "build", str(out), "--dataset", str(sample_dir), "--model",
               "scicevpr_tiny_random", "--local-features", "--local-storage", "int8",
               "--device", "cpu", "--json"])
    assert rc == 0
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert manifest["local_features"]["storage"] == "int8"
    rc = main(["map", "info", str(out)])
    assert rc == 0 and "int8" in capsys.readouterr().out
