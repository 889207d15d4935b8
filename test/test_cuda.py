"""CUDA checks (skipped where no CUDA device exists; `make gpu-check` runs them on a GPU
machine): fp16/bf16 descriptors close to fp32, GPU re-ranking counts equal to the exact
CPU counts on every fixture set, bf16 GPU re-ranking exact for its own similarities,
int8 refused on CUDA, faiss-gpu search equal to the CPU search where faiss-gpu exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_descriptors_on_cuda_close_to_cpu(precision):
    from vpr_ros.inference import GlobalDescriber

    cpu = GlobalDescriber("demo_tiny", device="cpu")
    gpu = GlobalDescriber("demo_tiny", device="cuda", precision=precision)
    x = torch.rand(4, 3, *cpu.input_size, generator=torch.Generator().manual_seed(0))
    assert _cosine_min(gpu.describe_tensor(x), cpu.describe_tensor(x)) >= 0.999


def test_int8_is_refused_on_cuda():
    from vpr_ros.errors import DeviceError
    from vpr_ros.inference import GlobalDescriber

    with pytest.raises(DeviceError):
        GlobalDescriber("demo_tiny", device="cuda", precision="int8")


def test_gpu_rerank_counts_equal_cpu_exact_on_reference(reference):
    from vpr_ros.models.rerank import mutual_nn_counts

    for path in sorted(reference.glob("selavpr*_outputs.npz")):
        data = np.load(path)
        feats = torch.from_numpy(data["local_feats"])
        for i in range(feats.shape[0]):
            gpu = mutual_nn_counts(feats[i].cuda(), feats, device="cuda").cpu().numpy()
            np.testing.assert_array_equal(gpu, data["mutual_nn_counts"][i], err_msg=path.name)


def test_gpu_bf16_rerank_exact_for_its_similarities(reference):
    from vpr_ros.models.rerank import mutual_nn_counts

    path = sorted(reference.glob("selavpr*_outputs.npz"))[0]
    feats = torch.from_numpy(np.load(path)["local_feats"])
    q = feats[0].reshape(-1, feats.shape[-1]).cuda()
    got = mutual_nn_counts(q, feats, device="cuda", compute="bf16").cpu().tolist()
    want = []
    for c in feats.reshape(feats.shape[0], -1, feats.shape[-1]).cuda():
        sim = torch.matmul(c.to(torch.bfloat16), q.to(torch.bfloat16).T).float()
        back = sim.argmax(dim=1)[sim.argmax(dim=0)]
        want.append(int((back == torch.arange(q.shape[0], device="cuda")).sum()))
    assert got == want


def test_faiss_gpu_search_equals_cpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss without GPU support (faiss-cpu)")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5000, 64)).astype(np.float32)
    query = rng.standard_normal((50, 64)).astype(np.float32)
    cpu = faiss.IndexFlatIP(64)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    d_cpu, i_cpu = cpu.search(query, 10)
    d_gpu, i_gpu = gpu.search(query, 10)
    assert (i_cpu[:, 0] == i_gpu[:, 0]).mean() >= 0.98
    np.testing.assert_allclose(d_cpu, d_gpu, rtol=1e-4, atol=1e-4)
