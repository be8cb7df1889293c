#!/usr/bin/env bash
# Upgrade demonstration: the release binary in front of a private Dovecot with 1000 IDLE sessions and a
# client connecting every 20 ms, upgraded in place with SIGUSR2. Prints refused connections, BYEs per
# second over the drain window and Dovecot's logins per second. The shipped drain_spread_secs (300) makes
# it a six-minute run; `scripts/upgrade.sh --spread 30` shows the same in half a minute (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh --test-tools
cargo build --locked --release --bin imapgate --example upgrade
export RUST_LOG="${RUST_LOG:-error}"
exec target/release/examples/upgrade "$@"
