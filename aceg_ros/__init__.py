"""ROS 2 glue for ACE-G relocalization: node, services, bag I/O, replay, CLIs.

Modules that need rclpy import it themselves, so bag tools work without a
ROS middleware.
"""
import os

# On a shared CPU, OpenMP threads that spin while waiting made torch 35-50x
# slower here (measured: encoder 700 ms -> 15 ms per 240x320 image). This
# must be set before torch loads its OpenMP runtime; the package is imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

