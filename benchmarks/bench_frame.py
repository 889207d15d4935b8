"""One two-stage frame, end to end: the package against the official code in the same run.

A frame is what a robot without a GPU computes per camera image: the SciceVPR-B global
descriptor of the image (224x224), the SelaVPR ViT-L/14 local features of the same image
(the query's 61x61x128 map; its global descriptor comes with it), and the exact
mutual-nearest-neighbour re-ranking of the top-20 candidates.  Both sides run full-size
models with random weights (speed does not depend on the values), batch 1, 2 threads,
interleaved round-robin in one process so that load from other jobs hits both alike.

* **official**: the official source trees, unmodified, imported from ``--official DIR``
  (``DIR/SciceVPR`` = github.com/shuimushan/SciceVPR, ``DIR/SelaVPR`` =
  github.com/Lu-Feng/SelaVPR; nothing of them is copied into the package).  SciceVPR is
  built as its ``eval.py`` builds SciceVPR-B (DINOv2 ViT-B/14 through the bundled hub
  repository, blocks 8-11, mix 768, 2 token mixers) from a temporary copy of the tree
  holding random DINOv2 weights where the code loads its pretrained ones, with the device
  default of ``DinoV2_self`` set to the CPU (it is hard-wired to ``cuda:0``).  SelaVPR is
  ``network.GeoLocalizationNet`` (ViT-L/14 with adapters, no registers).  The re-ranking
  is ``match_batch_tensor`` of ``local_matching.py`` as written, minus its ``.cuda()``
  calls: ``bench_rerank.official_batched_counts`` (the existing baseline transcription).
* **package**: ``GlobalDescriber("scicevpr_b", precision="int8")``,
  ``LocalFeatureExtractor("selavpr_vitl14", precision="int8")`` and
  ``mutual_nn_counts`` (exact, the verified path), as the localizer runs them.

The re-ranking of both sides takes the same synthetic SelaVPR-shaped maps
(``bench_rerank.synthetic_maps``; random-weight features have no place structure) and the
benchmark asserts identical counts.

Run: ``python benchmarks/bench_frame.py --official DIR [--repeats N]`` or ``make bench-frame
OFFICIAL_DIR=DIR``; prints the table with the machine and the date, writes
``frame.json`` and ``frame.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (DEFAULT_OUT, interleaved_times, machine_info, md_table, median,
                               set_threads, write_outputs)

TOP_K = 20


@contextlib.contextmanager
def _cwd(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _import_fresh(root: Path, names):
    """Import ``names`` from the official tree ``root`` (first on sys.path)."""
    import importlib
    sys.path.insert(0, str(root))
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(str(root))


def official_scicevpr_b(tree: Path, work: Path):
    """SciceVPR-B as the official eval.py builds it, random weights (seed 0), on the CPU."""
    import torch

    copy = work / "SciceVPR"
    shutil.copytree(tree, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    os.environ["TORCH_HOME"] = str(work / "torch_home")      # the hub cache: no download
    sys.path.insert(0, str(copy))                            # its modules import from its root
    try:
        with _cwd(copy):
            torch.manual_seed(0)
            dino = torch.hub.load("./models/backbones/facebookresearch_dinov2_main/dinov2",
                                  "dinov2_vitb14", source="local", trust_repo=True,
                                  pretrained=False)
            state = dino.state_dict()
            (copy / "weights").mkdir(exist_ok=True)
            torch.save(state, copy / "weights" / "dinov2_vitb14_pretrain.pth")
            ckpt = work / "torch_home" / "hub" / "checkpoints"
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(state, ckpt / "dinov2_vitb14_pretrain.pth")
            import importlib
            scicevpr = importlib.import_module("scicevpr")
            backbones = importlib.import_module("models.backbones.DINOv2_self")
            init = backbones.DinoV2_self.__init__
            defaults = list(init.__defaults__)
            defaults[defaults.index("cuda:0")] = "cpu"      # hard-wired device default
            init.__defaults__ = tuple(defaults)
            model = scicevpr.SciceVPR(backbone_arch="dinov2_vitb14", pretrained=True, layer1=8,
                                      use_cls=False, norm_descs=True, out_indices=[8, 9, 10, 11],
                                      backbone_out_dim=768 * 4, mix_in_dim=768, token_num=2,
                                      token_ratio=1)
    finally:
        sys.path.remove(str(copy))
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[name]                                # SelaVPR has other modules
    return model.eval()


def official_selavpr_vitl14(tree: Path):
    import torch

    torch.manual_seed(0)
    (network,) = _import_fresh(tree, ["network"])
    args = types.SimpleNamespace(registers=False, foundation_model_path=None, resume="random")
    return network.GeoLocalizationNet(args).eval()


def run(official: Path, repeats: int) -> dict:
    import torch

    from bench_rerank import official_batched_counts, synthetic_maps
    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
    from vpr_ros.models.cards import load_card
    from vpr_ros.models.rerank import mutual_nn_counts

    set_threads(2)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 224, 224)
    queries, cands = synthetic_maps(1, TOP_K, seed=TOP_K)
    q_local, c_local = queries[0].float(), cands[0]
    with tempfile.TemporaryDirectory() as tmp:
        off_scice = official_scicevpr_b(official / "SciceVPR", Path(tmp))
    off_sela = official_selavpr_vitl14(official / "SelaVPR")
    pkg_scice = GlobalDescriber(load_card("scicevpr_b").replace(random_init_seed=0),
                                device="cpu", precision="int8", batch_size=1)
    pkg_sela = LocalFeatureExtractor(load_card("selavpr_vitl14").replace(random_init_seed=0),
                                     device="cpu", precision="int8", batch_size=1)
    official_counts = official_batched_counts(q_local, c_local)
    package_counts = mutual_nn_counts(q_local, c_local)
    assert torch.equal(official_counts, package_counts), (official_counts, package_counts)

    def off_descriptor():
        with torch.no_grad():
            return off_scice(image)

    def off_local():
        with torch.no_grad():
            return off_sela(image)

    stages = {
        "official_descriptor": off_descriptor,
        "package_descriptor": lambda: pkg_scice.describe_tensor(image),
        "official_local": off_local,
        "package_local": lambda: pkg_sela.extract_tensor(image),
        "official_rerank": lambda: official_batched_counts(q_local, c_local),
        "package_rerank": lambda: mutual_nn_counts(q_local, c_local),
    }
    with torch.no_grad():
        assert off_descriptor().shape[-1] == 10752 and off_local()[0].shape[1:3] == (61, 61)
    times = interleaved_times(stages, repeats, warmup=1)
    med = {n: median(t) for n, t in times.items()}
    # a frame = the three stages of one round, summed per round (then the median)
    parts = ("descriptor", "local", "rerank")
    frames = {side: median([sum(times[f"{side}_{s}"][r] for s in parts) for r in range(repeats)])
              for side in ("official", "package")}
    rows = {}
    for stage in ("descriptor", "local", "rerank"):
        o, p = med[f"official_{stage}"], med[f"package_{stage}"]
        rows[stage] = {"official_s": o, "package_s": p, "speedup": o / p}
    rows["frame"] = {"official_s": frames["official"], "package_s": frames["package"],
                     "speedup": frames["official"] / frames["package"]}
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "machine": machine_info(), "repeats": repeats, "top_k": TOP_K,
            "counts_identical": True, "stages": rows, "times_s": times}


STAGE_NAMES = {"descriptor": "SciceVPR-B descriptor (int8)",
               "local": "SelaVPR ViT-L query features (int8)",
               "rerank": f"MNN re-rank top-{TOP_K} (exact)", "frame": "**whole frame**"}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## One two-stage frame: package vs official code (same run)", "",
             f"{res['date_utc']} UTC; {m.get('cpu_model', '?')}, {m.get('logical_cpus', '?')} "
             f"logical CPUs, load average at start {m.get('loadavg_at_start', '?')}; "
             "batch 1, 2 threads, "
             f"medians of {res['repeats']} interleaved rounds; re-ranking counts identical.", ""]
    rows = [[STAGE_NAMES[k], f"{v['official_s']:.3f}", f"{v['package_s']:.3f}",
             f"{v['speedup']:.2f}x"] for k, v in res["stages"].items()]
    lines.append(md_table(["stage", "official s", "package s", "speed-up"], rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, default=os.environ.get("OFFICIAL_DIR"),
                    help="folder holding the official SciceVPR/ and SelaVPR/ source trees "
                         "(default $OFFICIAL_DIR)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    missing = [n for n in ("SciceVPR/scicevpr.py", "SelaVPR/network.py")
               if args.official is None or not (args.official / n).is_file()]
    if missing:
        print(f"bench_frame: the official code is needed: --official DIR (or OFFICIAL_DIR) with "
              f"{' and '.join(missing)} (git clone github.com/shuimushan/SciceVPR and "
              f"github.com/Lu-Feng/SelaVPR into DIR)", file=sys.stderr)
        sys.exit(2)
    res = run(args.official.resolve(), max(1, args.repeats))
    print(write_outputs(args.out, "frame", res, markdown))


if __name__ == "__main__":
    main()
