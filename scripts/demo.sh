#!/usr/bin/env bash
# The end-to-end demo, self-setting-up: ./scripts/demo.sh [--data DIR] [--seed N] [--out DIR] ...
# Renders a room (or reads --data), writes mapping and query bags, starts the aceg_localizer node,
# maps the scene over DDS (/aceg/map_scene), replays the query bags through the node and prints
# the accuracy table and the paths of the plots (python -m aceg_ros.demo --help for the options).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m aceg_ros.demo "$@"
