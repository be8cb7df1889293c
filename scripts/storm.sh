#!/usr/bin/env bash
# Failed-login storm benchmark: attempts reaching the backend, defence memory, legitimate login latency.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh
cargo build --locked --release --bin imapgate --example storm
exec target/release/examples/storm "$@"
