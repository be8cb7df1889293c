#!/usr/bin/env bash
# Installs what the tests and the demo need from Debian when it is missing: dovecot-imapd (only its
# binaries are used: tests and the demo run private instances with their own configuration; the system's
# Dovecot is never configured) and, with --test-tools, what the test suite also starts or calls: haproxy (a real
# load balancer in front of imapgate, run from a private configuration), prometheus (for promtool) and openssl
# (a TLS client that sends an IP address as SNI), python3 (the tests' user lookup service) and systemd
# (systemd-analyze, which checks the unit file).
set -euo pipefail
packages=()
if ! [ -x /usr/sbin/dovecot ] && ! [ -x /usr/local/sbin/dovecot ]; then
  packages+=(dovecot-imapd)
fi
if [ "${1:-}" = "--test-tools" ]; then
  command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
  [ -x /usr/sbin/haproxy ] || packages+=(haproxy)
  command -v openssl >/dev/null 2>&1 || packages+=(openssl)
  command -v python3 >/dev/null 2>&1 || packages+=(python3)
  command -v systemd-analyze >/dev/null 2>&1 || packages+=(systemd)
fi
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${packages[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
