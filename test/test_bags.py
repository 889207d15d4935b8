"""rosbag2 reading/writing with rosbags: sqlite3 and mcap, Image and CompressedImage, poses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.bags import (BagFrame, PoseTrack, bag_summary, bag_topics, read_image_stamps,
                          read_images, read_poses, write_image_bag)
from vpr_ros.errors import BagError, ImageError, UnsupportedEncodingError
from vpr_ros.preprocess import load_image

SEC = 1_000_000_000


@pytest.fixture(scope="module")
def frames(sample_dir):
    paths = sorted((sample_dir / "images" / "test" / "queries").glob("*.jpg"))[:6]
    return [BagFrame(stamp_ns=(i + 1) * SEC // 2, image=load_image(p),
                     position=(0.0, 20.0 * i, 0.0)) for i, p in enumerate(paths)]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize("compressed", [False, True])
def test_write_read_round_trip(tmp_path, frames, storage, compressed):
    bag = tmp_path / "cam"
    assert write_image_bag(bag, frames, storage=storage, compressed=compressed) == len(frames)
    topics = bag_topics(bag)
    kind = "CompressedImage" if compressed else "Image"
    assert topics["/camera/image_raw"] == (f"sensor_msgs/msg/{kind}", len(frames))
    assert topics["/ground_truth/pose"] == ("geometry_msgs/msg/PoseStamped", len(frames))
    got = list(read_images(bag, "/camera/image_raw"))
    assert [g.stamp_ns for g in got] == [f.stamp_ns for f in frames]
    assert [g.index for g in got] == list(range(len(frames)))
    assert all(g.frame_id == "camera" for g in got)
    for g, f in zip(got, frames):
        diff = np.abs(g.image.astype(int) - f.image.astype(int))
        assert diff.max() == 0 if not compressed else diff.mean() < 3
    np.testing.assert_array_equal(read_image_stamps(bag, "/camera/image_raw"),
                                  [f.stamp_ns for f in frames])
    track = read_poses(bag, "/ground_truth/pose")
    assert len(track) == len(frames) and track.frame_id == "map"
    summary = bag_summary(bag)
    assert summary["storage"] == storage and summary["message_count"] == 2 * len(frames)
    assert not list(tmp_path.glob(".cam*")), "temporary folders left behind"


def test_encodings_written_and_read(tmp_path, frames):
    for enc in ("bgr8", "mono8", "bayer_rggb8"):
        bag = tmp_path / enc
        write_image_bag(bag, frames[:2], encoding=enc, pose_topic=None)
        got = next(read_images(bag, "/camera/image_raw"))
        assert got.image.shape == frames[0].image.shape
        assert list(bag_topics(bag)) == ["/camera/image_raw"]


def test_pose_interpolation_linear_and_slerp():
    yaw = [0.0, math.pi / 2]
    quats = [(0, 0, math.sin(a / 2), math.cos(a / 2)) for a in yaw]
    track = PoseTrack(np.array([2 * SEC, 4 * SEC]), np.array([[0, 0, 0], [10, 20, 2]]),
                      np.array(quats))
    pos, ori, valid = track.interpolate([2 * SEC, 3 * SEC, 4 * SEC, SEC, 5 * SEC], max_gap_s=5)
    assert valid.tolist() == [True, True, True, False, False]
    np.testing.assert_allclose(pos[1], [5, 10, 1])
    np.testing.assert_allclose(ori[1], [0, 0, math.sin(math.pi / 8), math.cos(math.pi / 8)],
                               atol=1e-12)
    np.testing.assert_allclose(pos[2], [10, 20, 2])
    assert np.isnan(pos[3]).all()
    # the same stamps inside a gap larger than max_gap_s are invalid
    _, _, valid = track.interpolate([3 * SEC], max_gap_s=1.0)
    assert not valid[0]


def test_pose_track_sorts_and_takes_shortest_arc():
    q = np.array([[0, 0, 0, 1.0], [0, 0, 0, -1.0]])   # same rotation, opposite signs
    track = PoseTrack(np.array([2 * SEC, 0]), np.zeros((2, 3)), q)
    assert track.stamps_ns.tolist() == [0, 2 * SEC]
    _, ori, _ = track.interpolate([SEC], max_gap_s=10)
    assert abs(abs(ori[0, 3]) - 1) < 1e-9


def test_read_poses_of_other_message_types(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    bag = tmp_path / "odom"
    with Writer(bag, version=9) as w:
        odom = w.add_connection("/odom", "nav_msgs/msg/Odometry", typestore=ts)
        pwc = w.add_connection("/amcl_pose", "geometry_msgs/msg/PoseWithCovarianceStamped",
                               typestore=ts)
        for i in range(3):
            stamp = T["builtin_interfaces/msg/Time"](sec=i, nanosec=5)
            hdr = T["std_msgs/msg/Header"](stamp=stamp, frame_id="odom")
            pose = T["geometry_msgs/msg/Pose"](
                position=T["geometry_msgs/msg/Point"](x=float(i), y=2.0 * i, z=0.0),
                orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
            pwcov = T["geometry_msgs/msg/PoseWithCovariance"](pose=pose,
                                                              covariance=np.zeros(36))
            twist = T["geometry_msgs/msg/TwistWithCovariance"](
                twist=T["geometry_msgs/msg/Twist"](
                    linear=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                    angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)),
                covariance=np.zeros(36))
            msg = T["nav_msgs/msg/Odometry"](header=hdr, child_frame_id="base", pose=pwcov,
                                             twist=twist)
            w.write(odom, i * SEC + 5, ts.serialize_cdr(msg, "nav_msgs/msg/Odometry"))
            msg2 = T["geometry_msgs/msg/PoseWithCovarianceStamped"](header=hdr, pose=pwcov)
            w.write(pwc, i * SEC + 5, ts.serialize_cdr(
                msg2, "geometry_msgs/msg/PoseWithCovarianceStamped"))
    for topic in ("/odom", "/amcl_pose"):
        track = read_poses(bag, topic)
        assert track.stamps_ns.tolist() == [5, SEC + 5, 2 * SEC + 5]
        np.testing.assert_allclose(track.positions[2], [2, 4, 0])
        assert track.frame_id == "odom"
    with pytest.raises(BagError, match="not an image topic"):
        next(read_images(bag, "/odom"))


def test_errors(tmp_path, frames):
    with pytest.raises(BagError, match="not found"):
        bag_topics(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BagError, match="metadata.yaml"):
        bag_topics(tmp_path / "plain")
    bag = tmp_path / "nopose"
    write_image_bag(bag, [BagFrame(f.stamp_ns, f.image) for f in frames[:2]])
    with pytest.raises(BagError, match="no pose topics"):
        read_poses(bag, "/ground_truth/pose")
    with pytest.raises(BagError, match="not in bag"):
        next(read_images(bag, "/wrong/topic"))
    with pytest.raises(BagError, match="empty"):
        write_image_bag(tmp_path / "empty", [])
    assert not (tmp_path / "empty").exists()
    with pytest.raises(BagError, match="storage"):
        write_image_bag(tmp_path / "x", frames[:1], storage="zip")
    with pytest.raises(UnsupportedEncodingError):
        write_image_bag(tmp_path / "y", frames[:1], encoding="32FC1")
    with pytest.raises(BagError, match="backwards"):
        write_image_bag(tmp_path / "z", [frames[1], frames[0]])


def test_empty_topic_and_bad_frame(tmp_path, frames):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    bag = tmp_path / "bad"
    with Writer(bag, version=9) as w:
        w.add_connection("/empty", "sensor_msgs/msg/Image", typestore=ts)
        cam = w.add_connection("/cam", "sensor_msgs/msg/Image", typestore=ts)
        stamp = T["builtin_interfaces/msg/Time"](sec=1, nanosec=0)
        hdr = T["std_msgs/msg/Header"](stamp=stamp, frame_id="c")
        good = T["sensor_msgs/msg/Image"](header=hdr, height=1, width=2, encoding="mono8",
                                          is_bigendian=0, step=2,
                                          data=np.array([1, 2], np.uint8))
        unknown = T["sensor_msgs/msg/Image"](header=hdr, height=1, width=1, encoding="32FC1",
                                             is_bigendian=0, step=4,
                                             data=np.zeros(4, np.uint8))
        for i, m in enumerate([good, unknown, good]):
            w.write(cam, SEC + i, ts.serialize_cdr(m, "sensor_msgs/msg/Image"))
    with pytest.raises(BagError, match="no messages"):
        next(read_images(bag, "/empty"))
    with pytest.raises(UnsupportedEncodingError, match="frame 1"):
        list(read_images(bag, "/cam"))
    assert [f.index for f in read_images(bag, "/cam", skip_bad=True)] == [0, 2]
    assert issubclass(UnsupportedEncodingError, ImageError)
