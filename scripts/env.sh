# Sourced by scripts/test.sh and scripts/demo.sh: set up, activate the venv, isolate ROS 2.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
cd "$ROOT"
# A DDS domain of its own per run, discovery on loopback only, so parallel runs
# on one machine never see each other's (or anyone else's) nodes.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 90) + 10 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# OpenMP threads sleep while waiting instead of spinning: on a CPU shared with
# other work, spinning threads made torch inference tens of times slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
