#!/usr/bin/env bash
# The end-to-end demo, self-setting-up: ./scripts/demo.sh [--data DIR] [--seed N] [--out DIR] ...
# Renders a room (or reads --data), writes mapping and query bags, starts the aceg_localizer node,
# maps the scene over DDS (/aceg/map_scene), replays the query bags through the node and prints
# the accuracy table and the paths of the plots (python -m aceg_ros.demo --help for the options).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
cd "$ROOT"
# A DDS domain of its own, discovery on loopback only: the demo never talks to other ROS 2 nodes.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 90) + 10 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# OpenMP threads sleep while waiting instead of spinning: on a CPU shared with other work,
# spinning threads made inference tens of times slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m aceg_ros.demo "$@"
