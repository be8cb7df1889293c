#!/usr/bin/env bash
# Installs what the tests and the demo need from Debian when it is missing: dovecot-imapd (only its
# binaries are used: tests and the demo run private instances with their own configuration; the system's
# Dovecot is never configured) and, with --promtool, the prometheus package for promtool.
set -euo pipefail
packages=()
if ! [ -x /usr/sbin/dovecot ] && ! [ -x /usr/local/sbin/dovecot ]; then
  packages+=(dovecot-imapd)
fi
if [ "${1:-}" = "--promtool" ] && ! command -v promtool >/dev/null 2>&1; then
  packages+=(prometheus)
fi
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${packages[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
