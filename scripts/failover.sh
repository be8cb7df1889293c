#!/usr/bin/env bash
# Routing benchmark: a pool of three Dovecot members, one switched off and on under steady logins (circuit
# timing, failed logins with failover none and next, recovery), and the latency of an HTTP user lookup.
# Takes about two and a half minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh --test-tools
cargo build --locked --release --example failover
export RUST_LOG="${RUST_LOG:-error}"
exec target/release/examples/failover "$@"
