#!/usr/bin/env bash
# Installs what the tests and the demo need from Debian when it is missing: dovecot-imapd (only its
# binaries are used: tests and the demo run private instances with their own configuration; the system's
# Dovecot is never configured) and, with --test-tools, what the test suite also starts or calls: haproxy (a real
# load balancer in front of imapgate, run from a private configuration), prometheus (for promtool) and openssl
# (a TLS client that sends an IP address as SNI, and key updates), gnutls-bin (gnutls-cli: a second TLS
# stack against the listener), python3 (the tests' user lookup service), redis-server (shared
# defence state for several instances; private instances on run-time ports), systemd (systemd-analyze,
# which checks the unit file), chromium and chromium-driver (the console's test in a real headless browser),
# nginx-light and curl (the web server that shares port 443 with IMAP, and an HTTPS client),
# and kubernetes-validate from PyPI in a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
if ! [ -x /usr/sbin/dovecot ] && ! [ -x /usr/local/sbin/dovecot ]; then
  packages+=(dovecot-imapd)
fi
if [ "${1:-}" = "--test-tools" ]; then
  command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
  [ -x /usr/sbin/haproxy ] || packages+=(haproxy)
  command -v openssl >/dev/null 2>&1 || packages+=(openssl)
  command -v gnutls-cli >/dev/null 2>&1 || packages+=(gnutls-bin)
  command -v python3 >/dev/null 2>&1 || packages+=(python3)
  command -v systemd-analyze >/dev/null 2>&1 || packages+=(systemd)
  [ -x /usr/bin/redis-server ] || packages+=(redis-server)
  [ -x /usr/bin/chromium ] || packages+=(chromium)
  [ -x /usr/bin/chromedriver ] || packages+=(chromium-driver)
  # nginx as the web server sharing port 443 with IMAP (a private configuration), and curl as its client.
  [ -x /usr/sbin/nginx ] || packages+=(nginx-light)
  command -v curl >/dev/null 2>&1 || packages+=(curl)
  # A venv for PyPI's kubernetes-validate (below) needs Debian's python3-venv.
  command -v python3 >/dev/null 2>&1 && python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "installing Debian packages: ${packages[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi
# kubernetes-validate (PyPI) in a private venv under target/, for the offline check of deploy/kubernetes.
if [ "${1:-}" = "--test-tools" ] && ! [ -x target/tools/k8s/bin/kubernetes-validate ]; then
  echo "installing kubernetes-validate into target/tools/k8s" >&2
  python3 -m venv target/tools/k8s
  target/tools/k8s/bin/pip install --quiet --disable-pip-version-check kubernetes-validate
fi
