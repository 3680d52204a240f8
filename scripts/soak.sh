#!/usr/bin/env bash
# The long soak, apart from the suite: ./scripts/soak.sh [SECONDS] (default 180 s of streaming and checks).
# Tunables (environment): SOAK_RATE_HZ (30), SOAK_RSS_EVERY (200 frames), SOAK_RSS_BOUND_MB (40), SOAK_SWAPS (5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export SOAK_SECONDS="${1:-${SOAK_SECONDS:-180}}"
exec python -m pytest -q -s -p no:cacheprovider test/soak.py
