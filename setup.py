"""ament_python package definition: `colcon build` in a ROS 2 workspace, or pip in a venv."""
from glob import glob

from setuptools import find_packages, setup

package_name = "aceg_ros"


def share(folder: str, pattern: str = "*") -> tuple[str, list[str]]:
    """Install ``folder/pattern`` files to ``share/aceg_ros/folder``."""
    return (f"share/{package_name}/{folder}", sorted(f for f in glob(f"{folder}/{pattern}") if "." in f))


setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=["aceg_ros", "aceg_ros.*", "aceg_model", "aceg_model.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        share("launch", "*.py"),
        share("config"),
        share("models"),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="aceg_ros developers",
    maintainer_email="aceg-ros@users.noreply.github.com",
    description="ACE-G visual relocalization for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "aceg-make-bag = aceg_ros.make_bag:main",
            "aceg-eval = aceg_model.evaluate:main",
            "aceg-pretrain = aceg_model.pretrain:main",
            "aceg-map = aceg_ros.map_cli:main",
            "aceg-replay = aceg_ros.replay:main",
            "aceg-gen-scene = aceg_model.scene.cli:main",
            "aceg_localizer = aceg_ros.localizer_node:main",
        ],
    },
)
