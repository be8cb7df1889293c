#!/usr/bin/env bash
# Benchmark: Dovecot direct (implicit TLS) against the same Dovecot through imapgate (STARTTLS backend),
# nginx's mail proxy (one TLS leg) and HAProxy in TCP mode, in one run. Installs what it compares with from
# Debian when missing (nginx-light, libnginx-mod-mail, haproxy); none of them is configured system-wide:
# the benchmark runs private instances on run-time ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-dovecot.sh
packages=()
[ -x /usr/sbin/nginx ] || packages+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || packages+=(libnginx-mod-mail)
[ -x /usr/sbin/haproxy ] || packages+=(haproxy)
if [ ${#packages[@]} -gt 0 ]; then
  echo "installing Debian packages: ${packages[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi
cargo build --locked --release --bin imapgate --example bench
exec target/release/examples/bench "$@"
