"""int8 CPU forwards of SciceVPR-B and SelaVPR ViT-L: this tree's acceleration layer against
the one of an earlier commit, interleaved in one process.

Speed work on the int8 path changes a few percent at a time, less than the drift of a
shared machine between two runs; so both versions run in the same process, round-robin,
on copies of the same float model (full size, random weights, seed 0; SelaVPR's adapters
get random weights too, since its random init starts them at zero).  The earlier version
is ``vpr_ros/accel`` of ``--baseline`` (a git revision), extracted with ``git archive``
into a temporary folder and imported as a separate package (the layer imports only
itself), so the models' own code is the same on both sides.

Per model and side: median wall time and median CPU time (all threads) of a batch-1
224x224 forward, the ratio of the medians, the median of the per-round ratios, the load
average, and the fidelity: cosine to the float32 model (SciceVPR descriptor; SelaVPR
global descriptor and every local feature point), and for SciceVPR whether 4 images give
the same bits alone and in one batch.  CPU time is the steadier measure on a loaded
machine (waiting for a core costs wall time, not CPU time); wall time is what a quiet
machine shows.

Run: ``python benchmarks/bench_int8_forward.py [--baseline REV] [--rounds N]
[--models scicevpr_b,selavpr_vitl14]``; writes ``int8_forward.json`` and
``int8_forward.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (DEFAULT_OUT, REPO_ROOT, interleaved_wall_cpu, machine_info,
                               md_table, set_threads, write_outputs)

BASE_PACKAGE = "vpr_accel_baseline"


def import_baseline(rev: str, folder: Path):
    """``vpr_ros/accel`` at git revision ``rev`` as the package ``vpr_accel_baseline``."""
    blob = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", rev,
                           "vpr_ros/accel"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "vpr_ros" / "accel").rename(folder / BASE_PACKAGE)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{BASE_PACKAGE}.convert")


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _fidelity(name: str, ref, got) -> dict:
    import torch.nn.functional as F

    res = {}
    for i, (r, g) in enumerate(zip(_outputs(ref), _outputs(got))):
        if r.ndim == 4:      # SelaVPR local features (B, H, W, C): every point
            cos = F.cosine_similarity(g.reshape(-1, r.shape[-1]), r.reshape(-1, r.shape[-1]))
            res["local_min_cos"] = float(cos.min())
        else:
            key = "descriptor_min_cos" if i == 0 else f"output{i}_min_cos"
            res[key] = float(F.cosine_similarity(g, r).min())
    return res


def build(name: str):
    import torch

    from vpr_ros.models.cards import load_card
    from vpr_ros.models.factory import load_model

    model, card, _ = load_model(load_card(name).replace(random_init_seed=0), None, "cpu")
    if card.architecture == "selavpr":   # the random init starts the adapters at zero
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for blk in model.backbone.blocks:
                for ad in (blk.adapter1, blk.adapter2):
                    ad.fc2.weight.copy_(torch.randn(ad.fc2.weight.shape, generator=g) * 0.02)
                    ad.fc2.bias.copy_(torch.randn(ad.fc2.bias.shape, generator=g) * 0.02)
    return model


def run_model(name: str, base_convert, rounds: int) -> dict:
    import torch

    from vpr_ros.accel.convert import convert_to_int8

    fp32 = build(name)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        ref = fp32(x)
    sides = {"baseline": base_convert.convert_to_int8(copy.deepcopy(fp32)),
             "this tree": convert_to_int8(copy.deepcopy(fp32))}
    del fp32
    res = {"model": name, "sides": {}}
    with torch.inference_mode():
        for side, model in sides.items():
            entry = _fidelity(name, ref, model(x))
            if name.startswith("scicevpr"):
                x4 = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
                alone = torch.cat([model(x4[i:i + 1]) for i in range(4)])
                entry["alone_equals_batch"] = bool(torch.equal(alone, model(x4)))
            res["sides"][side] = entry
        load = [os.getloadavg()[0]]
        # the fidelity forwards above were the warm-up
        wall, cpu = interleaved_wall_cpu({side: (lambda m=model: m(x))
                                          for side, model in sides.items()},
                                         rounds, warmup=0, alternate=True)
        load.append(os.getloadavg()[0])
    for side in sides:
        res["sides"][side].update(wall_ms=1e3 * statistics.median(wall[side]),
                                  cpu_ms=1e3 * statistics.median(cpu[side]),
                                  wall_min_ms=1e3 * min(wall[side]))
    b, t = res["sides"]["baseline"], res["sides"]["this tree"]
    res["wall_ratio"] = b["wall_ms"] / t["wall_ms"]
    res["cpu_ratio"] = b["cpu_ms"] / t["cpu_ms"]
    res["per_round_wall_ratio"] = statistics.median(
        [x / y for x, y in zip(wall["baseline"], wall["this tree"])])
    res["loadavg"] = load
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## int8 forwards: this tree vs baseline (same process, interleaved)", "",
             f"{res['date_utc']} UTC; baseline `{res['baseline']}`; {m.get('cpu_model', '?')}, "
             f"{m.get('logical_cpus', '?')} logical CPUs; batch 1, 224x224, "
             f"{res['threads']} threads, OMP_WAIT_POLICY={res['omp_wait_policy']}, "
             f"medians of {res['rounds']} rounds.", ""]
    rows = []
    for r in res["models"]:
        for side, s in r["sides"].items():
            fid = ", ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in s.items() if k.endswith("cos") or k.startswith("alone"))
            rows.append([r["model"], side, f"{s['wall_ms']:.1f}", f"{s['wall_min_ms']:.1f}",
                         f"{s['cpu_ms']:.1f}", fid])
        rows.append([r["model"], "**ratio**", f"{r['wall_ratio']:.3f}",
                     f"per round {r['per_round_wall_ratio']:.3f}", f"{r['cpu_ratio']:.3f}",
                     f"load {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}"])
    lines.append(md_table(["model", "side", "wall ms (median)", "wall ms (min)",
                           "CPU ms (median)", "fidelity to fp32"], rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="HEAD~1",
                    help="git revision whose vpr_ros/accel is the baseline (default HEAD~1)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="scicevpr_b,selavpr_vitl14")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base_convert = import_baseline(args.baseline, Path(tmp))
        except subprocess.CalledProcessError as exc:
            print(f"bench_int8_forward: cannot read vpr_ros/accel at {args.baseline!r}: "
                  f"{exc.stderr.decode(errors='replace').strip()}", file=sys.stderr)
            sys.exit(2)
        models = [run_model(n.strip(), base_convert, max(1, args.rounds))
                  for n in args.models.split(",") if n.strip()]
    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "machine": machine_info(), "baseline": args.baseline, "rounds": args.rounds,
           "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "models": models}
    print(write_outputs(args.out, "int8_forward", res, markdown))


if __name__ == "__main__":
    main()
