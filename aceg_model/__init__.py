"""ACE-G scene coordinate regression: the method itself, with no ROS imports."""
import os

# On a shared CPU, OpenMP threads that spin while waiting made torch 35-50x
# slower here (measured: encoder 700 ms -> 15 ms per 240x320 image). This
# must be set before torch loads its OpenMP runtime; the package is imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from aceg_model.frames import Frame, Intrinsics, check_pose

__all__ = ["Frame", "Intrinsics", "check_pose"]
