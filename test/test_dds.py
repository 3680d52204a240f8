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


def test_spinning_survives_an_entity_destroyed_while_the_executor_collects_it(node) -> None:
    """The node destroys publishers and subscriptions at deactivate / cleanup from a service callback
    in a MultiThreadedExecutor worker; when that races with the executor collecting the wait set,
    rclpy raises InvalidHandle in the spinning thread and ``executor.spin()`` ends (ros2/rclpy#1284;
    seen once in CI). The race is replayed deterministically with a waitable that is destroyed the
    first time it is collected: ``aceg_ros.spinning.spin`` keeps spinning, the node's timer fires on."""
    import threading

    from rclpy._rclpy_pybind11 import InvalidHandle
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.waitable import NumberOfEntities, Waitable

    from aceg_ros.spinning import spin

    class DestroyedWhileCollected(Waitable):
        def __init__(self) -> None:
            super().__init__(node.default_callback_group)
            self.collected = threading.Event()

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def get_num_entities(self) -> NumberOfEntities:
            return NumberOfEntities()

        def add_to_wait_set(self, wait_set) -> None:
            node.remove_waitable(self)  # gone from the next collection, as a destroyed entity is
            self.collected.set()
            raise InvalidHandle("cannot use Destroyable because destruction was requested")

        def is_ready(self, wait_set) -> bool:
            return False

        def take_data(self):
            return None

        async def execute(self, taken_data) -> None:
            return None

    ticks = []
    node.create_timer(0.01, lambda: ticks.append(time.monotonic()))
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    thread = threading.Thread(target=spin, args=(executor,), daemon=True)
    thread.start()
    try:
        racer = DestroyedWhileCollected()
        node.add_waitable(racer)
        executor.wake()
        assert racer.collected.wait(5.0), "the executor never collected the waitable"
        after = time.monotonic()
        deadline = after + 5.0
        while not (ticks and ticks[-1] > after) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread.is_alive() and ticks and ticks[-1] > after, "the executor stopped spinning"
    finally:
        executor.shutdown()
        thread.join(timeout=5.0)
