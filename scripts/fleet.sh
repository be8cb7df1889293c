#!/usr/bin/env bash
# Fleet benchmark: one imapgate alone against two behind HAProxy sharing Redis (logins/s, LOGIN latency
# with and without Redis, ban propagation between instances over 100 bans), shipped defence defaults.
# Takes about two minutes (the ban phase waits out the shipped tarpit).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh --test-tools
cargo build --locked --release --example fleet
export RUST_LOG="${RUST_LOG:-error}"
exec target/release/examples/fleet "$@"
