#!/usr/bin/env bash
# Benchmark: Dovecot direct (implicit TLS) against the same Dovecot through imapgate (STARTTLS backend).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh
cargo build --locked --release --bin imapgate --example bench
exec target/release/examples/bench "$@"
