"""Real DDS in the test process: rclpy publishers and subscribers over Fast DDS."""
from __future__ import annotations

import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from geometry_msgs.msg import TransformStamped  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

pytestmark = pytest.mark.ros


@pytest.fixture
def node():
    rclpy.init()
    n = rclpy.create_node("aceg_test_dds")
    yield n
    n.destroy_node()
    rclpy.shutdown()


def exchange(node, msg_type, topic: str, msg, timeout: float = 10.0):
    """Publish ``msg`` until it arrives on a subscription in the same process; return what arrived."""
    got = []
    node.create_subscription(msg_type, topic, got.append, 10)
    pub = node.create_publisher(msg_type, topic, 10)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        pub.publish(msg)
        rclpy.spin_once(node, timeout_sec=0.1)
    assert got, f"no {msg_type.__name__} received on {topic} within {timeout} s"
    return got[0]


def test_image_crosses_dds(node) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    msg = Image(height=48, width=64, encoding="rgb8", step=64 * 3, data=pixels.tobytes())
    msg.header.frame_id = "camera_optical_frame"
    got = exchange(node, Image, "dds_test_image", msg)
    assert (got.height, got.width, got.encoding) == (48, 64, "rgb8")
    assert np.array_equal(np.frombuffer(bytes(got.data), np.uint8).reshape(48, 64, 3), pixels)


def test_tf_message_crosses_dds(node) -> None:
    t = TransformStamped()
    t.header.frame_id, t.child_frame_id = "map", "camera"
    t.transform.translation.x, t.transform.rotation.w = 1.5, 1.0
    got = exchange(node, TFMessage, "dds_test_tf", TFMessage(transforms=[t]))
    assert got.transforms[0].child_frame_id == "camera"
    assert got.transforms[0].transform.translation.x == 1.5
