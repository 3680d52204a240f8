#!/usr/bin/env bash
# One-command set-up: a venv in the repository with pinned torch, real ROS 2
# Python wheels (rclpy + Fast DDS), the tf2_msgs interfaces built locally, and
# aceg_ros installed so that ament_index finds it. Idempotent: on a ready venv
# it checks a stamp and returns in about a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
cd "$ROOT"

say() { printf '[setup] %s\n' "$*" >&2; }

# The stamp covers everything that decides what the venv holds.
stamp_of() { cat requirements.txt setup.py setup.cfg package.xml tools/tf2_msgs/msg/*.msg tools/tf2_msgs/CMakeLists.txt scripts/setup.sh | sha256sum | cut -d' ' -f1; }
STAMP="$(stamp_of)"
if [[ -f "$VENV/.aceg-setup-stamp" && "$(cat "$VENV/.aceg-setup-stamp")" == "$STAMP" ]]; then
  exit 0
fi

t0=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version' \
    || { say "Python >= 3.10 is needed (found $("$PY" --version 2>&1))"; exit 1; }
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PIP=(python -m pip --disable-pip-version-check -q)
say "installing pinned packages (requirements.txt)"
"${PIP[@]}" install "pip==26.3" "setuptools==79.0.1" "wheel==0.45.1" 2>&1 | grep -v 'is ignored' || true
# torch first and alone: pinned to the CPU build so nothing pulls a CUDA build.
"${PIP[@]}" install torch==2.13.0 2>&1 | grep -v 'is ignored' || true
"${PIP[@]}" install -r requirements.txt 2>&1 | grep -v 'is ignored' || true
python -c 'import torch, rclpy, poselib, rosbags, cv2' \
  || { say "pinned packages did not install; see the pip output above"; exit 1; }

export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
if ! python -c 'import tf2_msgs.msg' 2>/dev/null; then
  say "building tf2_msgs (TFMessage) into the venv with colcon"
  command -v cmake >/dev/null || "${PIP[@]}" install cmake
  command -v cc >/dev/null || command -v gcc >/dev/null \
    || { say "a C compiler (gcc) is needed to build tf2_msgs: apt-get install build-essential"; exit 1; }
  build="$(mktemp -d)"
  (cd "$build" && colcon --log-base "$build/log" build --base-paths "$ROOT/tools/tf2_msgs" \
      --build-base "$build/build" --install-base "$VENV" --merge-install \
      --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VENV/bin/python" >"$build/colcon.txt" 2>&1) \
    || { cat "$build/colcon.txt" >&2; say "tf2_msgs build failed (log above)"; exit 1; }
  rm -rf "$build"
  python -c 'import tf2_msgs.msg'
fi

say "installing aceg_ros (editable) and its ament index entry"
"${PIP[@]}" install --no-deps --no-build-isolation -e . 2>&1 | grep -v 'is ignored' || true
# Editable installs skip data_files, so register the package with ament_index
# by hand: the marker file plus share/aceg_ros pointing at the repository.
mkdir -p "$VENV/share/ament_index/resource_index/packages" "$VENV/share/aceg_ros"
touch "$VENV/share/ament_index/resource_index/packages/aceg_ros"
for item in package.xml launch config models; do
  ln -sfn "$ROOT/$item" "$VENV/share/aceg_ros/$item"
done
# Every shell that activates the venv gets the ROS environment.
if ! grep -q 'aceg_ros environment' "$VENV/bin/activate"; then
  cat >>"$VENV/bin/activate" <<ACT
# aceg_ros environment
export AMENT_PREFIX_PATH="\$VIRTUAL_ENV"
export RMW_IMPLEMENTATION="\${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export OMP_WAIT_POLICY="\${OMP_WAIT_POLICY:-PASSIVE}"
ACT
fi
python -c "from ament_index_python.packages import get_package_share_directory as g; g('aceg_ros')"
echo "$STAMP" >"$VENV/.aceg-setup-stamp"
say "ready in $((SECONDS - t0)) s: source .venv/bin/activate"
