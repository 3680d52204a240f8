"""Spinning an executor while the node creates and destroys entities at lifecycle transitions.

rclpy's executors collect every waitable of their nodes (a publisher's or a
subscription's QoS event handlers among them) before each wait. When another
thread destroys such an entity in between (our node does on deactivate and
cleanup, from a service callback running in a ``MultiThreadedExecutor``
worker), adding it to the wait set raises ``InvalidHandle`` and ``spin()``
ends: the node stops answering. Known and open upstream (ros2/rclpy#1284,
#1355). The next collection no longer holds the destroyed entity, so spinning
again is safe.
"""
from __future__ import annotations

from rclpy._rclpy_pybind11 import InvalidHandle
from rclpy.executors import Executor


def spin(executor: Executor) -> None:
    """``executor.spin()`` until shutdown, resumed after an entity destroyed while being collected."""
    while True:
        try:
            executor.spin()
            return
        except InvalidHandle:
            continue
