"""Node overhead: image message in -> match out through the ROS 2 node, vs the bare Localizer.

A map of the shipped Nordland sample (200 places) is built with the tiny random
SciceVPR card (the model is deliberately tiny so that the *overhead* of the node -
DDS transport, message conversion, the worker hand-off, JSON/pose publishing - is
visible rather than buried under model time).  Frames are sent one at a time over
Fast DDS on localhost (raw ``sensor_msgs/Image`` bgr8 640x... from the sample, and
``CompressedImage`` JPEG); the time from ``publish`` to the arrival of the node's
``~/matches`` message is compared with ``Localizer.localize`` on the same images in the
same process, interleaved frame by frame (bare, node, bare, node, ...) so that machine
load hits both alike.  Overhead = node median - bare median.

Run: ``python benchmarks/bench_node.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from common import DEFAULT_OUT, REPO_ROOT, fmt, md_table, median, set_threads, write_json

CARD = "scicevpr_tiny_random"
SAMPLE = REPO_ROOT / "samples" / "nordland_mini"


def run(quick: bool) -> dict:
    set_threads(2)
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(110, 200)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    import json

    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.localizer import Localizer
    from vpr_ros.maps import PlaceMap, benchmark_source, build_map
    from vpr_ros.preprocess import load_image
    from vpr_ros.ros.conversions import ns_to_stamp, rgb_to_compressed_msg, rgb_to_image_msg
    from vpr_ros.ros.localizer_node import LocalizerNode

    n_frames = 10 if quick else 40
    work = Path(tempfile.mkdtemp(prefix="vpr_bench_node_"))
    map_dir = work / "map"
    describer = GlobalDescriber(CARD, device="cpu", batch_size=8)
    build_map(benchmark_source(SAMPLE, "database"), map_dir, describer, index="Flat", progress=False)
    q_paths = sorted((SAMPLE / "images" / "test" / "queries").glob("*.jpg"))[:n_frames]
    images = [load_image(p) for p in q_paths]

    # bare Localizer, same settings as the node (batch 1, top-10)
    d1 = GlobalDescriber(CARD, device="cpu", batch_size=1)
    loc = Localizer(PlaceMap.open_for(map_dir, d1, device="cpu"), d1, top_k=10, confidence_threshold=0.0)
    loc.localize(images[0])
    bare = []

    def bare_once(img):
        t0 = time.perf_counter()
        loc.localize(img)
        bare.append(time.perf_counter() - t0)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    results = {}
    try:
        params = {"map_path": str(map_dir), "device": "cpu", "autostart": False, "top_k": 10,
                  "confidence_threshold": 0.0}
        for transport in ("raw", "compressed"):
            params["image_transport"] = transport
            node = LocalizerNode(context=context,
                                 parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
            peer = Node("vpr_bench_peer", context=context)
            got = []
            lock = threading.Lock()
            arrived = threading.Event()

            def on_match(msg, got=got):
                with lock:
                    got.append((time.perf_counter(), json.loads(msg.data)))
                arrived.set()
            peer.create_subscription(String, "/vpr_localizer/matches", on_match, 10)
            qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            pub = peer.create_publisher(Image if transport == "raw" else CompressedImage,
                                        "/camera/image_raw" + ("" if transport == "raw" else "/compressed"), qos)
            ex = MultiThreadedExecutor(num_threads=2, context=context)
            ex.add_node(node)
            ex.add_node(peer)
            th = threading.Thread(target=ex.spin, daemon=True)
            th.start()
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            deadline = time.monotonic() + 30
            while pub.get_subscription_count() == 0 or peer.count_publishers("/vpr_localizer/matches") == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("node did not connect within 30 s")
                time.sleep(0.05)
            time.sleep(0.5)
            e2e, node_total = [], []
            for i, img in enumerate([images[0]] + images):      # first frame = warm-up
                stamp = ns_to_stamp((10 + i) * 1_000_000_000)
                msg = (rgb_to_image_msg(img, stamp, "cam", encoding="bgr8") if transport == "raw"
                       else rgb_to_compressed_msg(img, stamp, "cam", fmt="jpeg"))
                if i > 0:
                    bare_once(img)        # interleaved: bare, node, bare, node, ...
                arrived.clear()
                n_before = len(got)
                t0 = time.perf_counter()
                pub.publish(msg)
                if not arrived.wait(60):
                    raise RuntimeError(f"no match message for frame {i} within 60 s")
                while len(got) == n_before:
                    time.sleep(0.001)
                if i > 0:
                    e2e.append(got[-1][0] - t0)
                    node_total.append(got[-1][1].get("timings_ms", {}).get("total", float("nan")) / 1000)
            ex.shutdown(timeout_sec=5)
            node._stop_worker()
            node.destroy_node()
            peer.destroy_node()
            results[transport] = {"e2e_ms": 1000 * median(e2e), "node_reported_total_ms": 1000 * median(node_total),
                                  "frames": len(e2e)}
    finally:
        rclpy.try_shutdown(context=context)
    bare_ms = 1000 * median(bare)
    for r in results.values():
        r["overhead_ms_vs_bare"] = r["e2e_ms"] - bare_ms
        r["ratio_to_bare"] = r["e2e_ms"] / bare_ms
    return {"card": CARD, "map_places": 200, "image_size": list(images[0].shape),
            "bare_localizer_ms": bare_ms, "node": results, "frames": len(images)}


def markdown(res: dict) -> str:
    rows = [["bare Localizer.localize", fmt(res["bare_localizer_ms"], 2), "-", "1.00"]]
    for t, r in res["node"].items():
        rows.append([f"node, {t} image", fmt(r["e2e_ms"], 2), fmt(r["overhead_ms_vs_bare"], 2),
                     fmt(r["ratio_to_bare"], 2)])
    return "\n".join(["## ROS 2 node end-to-end latency", "",
                      f"Tiny model ({res['card']}), {res['map_places']}-place map, "
                      f"{res['image_size'][1]}x{res['image_size'][0]} images, one frame at a time over "
                      "Fast DDS (localhost): publish -> ~/matches received.", "",
                      md_table(["path", "median ms", "overhead ms", "ratio"], rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    res = run(a.quick)
    write_json(a.out / "node.json", res)
    print(markdown(res))


if __name__ == "__main__":
    main()
