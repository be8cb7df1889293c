#!/usr/bin/env bash
# Crowd benchmark: one address bringing many users (webmail, office NAT, balancer) through imapgate with the
# shipped default defence, against the defence switched off and Dovecot directly; plus a credential-stuffing
# attack hidden inside the crowd. Prints figures; takes about six minutes with the default options.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh
cargo build --locked --release --bin imapgate --example crowd
exec target/release/examples/crowd "$@"
