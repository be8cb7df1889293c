#!/usr/bin/env bash
# Runs imapgate on 127.0.0.1:9993 in front of a private local Dovecot with demo users, messages and
# freshly generated certificates (all under .demo/). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh
cargo build --locked --release --bin imapgate --example demo
exec target/release/examples/demo "$@"
