#!/usr/bin/env bash
# The test suite, self-setting-up: ./scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q -p no:cacheprovider "$@"
