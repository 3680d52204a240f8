"""ROS 2 glue for ACE-G relocalization: node, services, bag I/O, replay, CLIs.

Modules that need rclpy import it themselves, so bag tools work without a
ROS middleware.
"""
