#!/usr/bin/env bash
# Installs Debian's dovecot-imapd when no dovecot binary is present. Only the binaries are used: tests and
# the demo run private instances with their own configuration; the system's Dovecot is never configured.
set -euo pipefail
if [ -x /usr/sbin/dovecot ] || [ -x /usr/local/sbin/dovecot ]; then
  exit 0
fi
echo "dovecot not found: installing Debian's dovecot-imapd" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dovecot-imapd >/dev/null
