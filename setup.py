"""ament_python build of vpr_ros: works with `colcon build` on a robot and with `pip install`."""

import os
from glob import glob

from setuptools import find_packages, setup

package_name = "vpr_ros"


def tree(src, dest_root):
    """data_files entries that install the folder ``src`` below ``dest_root`` as is."""
    entries = []
    for folder, _dirs, files in os.walk(src):
        if files:
            rel = os.path.relpath(folder, src)
            dest = dest_root if rel == "." else os.path.join(dest_root, rel)
            entries.append((dest, [os.path.join(folder, f) for f in sorted(files)]))
    return entries


share = os.path.join("share", package_name)
data_files = [
    ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
    (share, ["package.xml"]),
    (os.path.join(share, "launch"), glob("launch/*.launch.py")),
    (os.path.join(share, "config"), glob("config/*.yaml") + glob("config/*.rviz")),
    (os.path.join(share, "config", "train"), glob("config/train/*.yaml")),
    (os.path.join(share, "config", "train", "cards"), glob("config/train/cards/*.yaml")),
    (os.path.join(share, "models"), sorted(glob("models/*.yaml") + glob("models/*.safetensors")
                                           + glob("models/*.md") + glob("models/*.json"))),
]
data_files += tree("samples", os.path.join(share, "samples"))

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "benchmarks", "scripts"]),
    # C source of the int8 kernels, compiled on the target machine at first use
    package_data={"vpr_ros.accel": ["int8_kernels.c"]},
    data_files=data_files,
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="vpr_ros developers",
    maintainer_email="vpr-ros@example.org",
    description="Visual place recognition for ROS 2: SciceVPR global descriptors, FAISS maps, "
                "SelaVPR re-ranking, evaluation and training.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "vpr = vpr_ros.cli.main:main",
            "localizer_node = vpr_ros.ros.localizer_node:main",
        ],
    },
)
