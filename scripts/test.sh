#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against real Dovecot instances, and lints.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh --test-tools
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
