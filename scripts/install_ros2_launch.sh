#!/usr/bin/env bash
# Install the ROS 2 launch system (launch, launch_xml, launch_yaml, launch_ros, ros2launch) and the
# composition_interfaces interface package into a virtual environment that has the ROS 2
# wheels, from the pure-Python sources in ../shared/ros2_launch (see its README).
# Test tooling only: on a robot the launch of the installed ROS 2 is used.
#
#   scripts/install_ros2_launch.sh VENV [SRC]      (SRC default: ../shared/ros2_launch)
#
# Idempotent and fast on a rerun: a stamp in VENV records the installed source snapshot.
# The sources are copied to VENV/src/ros2_launch first (pip writes build/ into a source
# folder and ../shared is read-only in CI).
set -euo pipefail
VENV=$(cd "$1" && pwd)
SRC=${2:-../shared/ros2_launch}
PY="$VENV/bin/python"
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$SRC/src/launch_ros" ] || [ ! -d "$SRC/src/composition_interfaces" ]; then
  echo "install_ros2_launch: $SRC/src has no launch sources; skipping (launch tests will skip)"
  exit 0
fi
SRC=$(cd "$SRC" && pwd)
STAMP="$VENV/.ros2_launch_installed"
# what is installed: the snapshot (README lists the commits) plus this script and its requirements
KEY=$(cat "$SRC/README.md" "$0" "$HERE/requirements-ros-launch.txt" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] \
   && "$PY" -c "import launch_ros.actions, ros2launch.api, composition_interfaces.srv" 2>/dev/null; then
  echo "==> ROS 2 launch already installed from $SRC"
  exit 0
fi
echo "==> installing ROS 2 launch from $SRC into $VENV"
t0=$(date +%s)
"$PY" -m pip install --quiet -r "$HERE/requirements-ros-launch.txt"

WORK="$VENV/src/ros2_launch"
rm -rf "$WORK"
mkdir -p "$WORK"
# a writable copy without build leftovers
(cd "$SRC/src" && tar --exclude=build --exclude='*.egg-info' --exclude=__pycache__ -cf - .) \
  | (cd "$WORK" && tar -xf -)
chmod -R u+w "$WORK"
# launch_testing / launch_testing_ros are not installed: this snapshot registers a pytest
# plugin whose hooks take the `path` argument that pytest 9 removed, and loading it breaks
# every pytest run. The tests run launch files through ros2launch.api / LaunchService.
"$PY" -m pip uninstall -y -q launch_testing launch_testing_ros > /dev/null 2>&1 || true
"$PY" -m pip install --no-deps --no-build-isolation \
  "$WORK/launch" "$WORK/launch_xml" "$WORK/launch_yaml" "$WORK/launch_ros" \
  "$WORK/ros2launch" > "$WORK/pip.log" 2>&1 \
  || { tail -40 "$WORK/pip.log"; exit 1; }

# The wheels' rosidl_generator_py export files name the include folders of the machine that
# built them: point them at this venv's Python and numpy headers.
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NPINC=$("$PY" -c "import numpy; print(numpy.get_include())")
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
shopt -s nullglob
for f in "$VENV"/share/*/cmake/export_*__rosidl_generator_pyExport*.cmake \
         "$SITE"/*/share/*/cmake/export_*__rosidl_generator_pyExport*.cmake; do
  sed -i -E "s#/opt/python/[^;\"]*/include/python3\.[0-9]+#$PYINC#g; \
             s#/opt/python/[^;\"]*/numpy/(_core|core)/include#$NPINC#g" "$f"
done
shopt -u nullglob

BUILD="$WORK/build_composition_interfaces"
PREFIX_PATH=$("$PY" - <<'PYEOF'
import os, sys, glob
# the ROS wheels install their CMake packages under <venv>/share or site-packages/*/share
roots = {sys.prefix}
for d in glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "*", "share")):
    roots.add(os.path.dirname(d))
print(";".join(sorted(roots)))
PYEOF
)
cmake -S "$WORK/composition_interfaces" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DCMAKE_PREFIX_PATH="$PREFIX_PATH" -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$PY" \
  -DCMAKE_BUILD_TYPE=Release > "$WORK/cmake_configure.log" 2>&1 \
  || { tail -40 "$WORK/cmake_configure.log"; exit 1; }
cmake --build "$BUILD" -j2 > "$WORK/cmake_build.log" 2>&1 \
  || { tail -40 "$WORK/cmake_build.log"; exit 1; }
cmake --install "$BUILD" > "$WORK/cmake_install.log" 2>&1 \
  || { tail -40 "$WORK/cmake_install.log"; exit 1; }
rm -rf "$BUILD"
"$PY" -c "import launch_ros.actions, ros2launch.api, composition_interfaces.srv" \
  || { echo "install_ros2_launch: installed, but the import check failed"; exit 1; }
echo "$KEY" > "$STAMP"
echo "==> ROS 2 launch installed in $(( $(date +%s) - t0 )) s"
