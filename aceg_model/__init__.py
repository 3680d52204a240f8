"""ACE-G scene coordinate regression: the method itself, with no ROS imports."""
from aceg_model.frames import Frame, Intrinsics, check_pose

__all__ = ["Frame", "Intrinsics", "check_pose"]
