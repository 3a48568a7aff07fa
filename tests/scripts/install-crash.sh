#!/usr/bin/env bash
# Kills the agent at random points of an install, CYCLES times (default 200; CI runs 50 as
# part of `cargo test --workspace`). Pass a seed printed by a failing run to repeat it:
#   tests/scripts/install-crash.sh 200 1795947018484385011
set -euo pipefail
cd "$(dirname "$0")/../.."
export EDGELOOP_INSTALL_CYCLES="${1:-200}"
if [ -n "${2:-}" ]; then
  export EDGELOOP_INSTALL_SEED="$2"
fi
exec cargo test -p edgeloop-tests --test install_crash -- --nocapture sigkill_during_installs
