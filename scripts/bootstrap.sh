#!/usr/bin/env bash
# Shared by scripts/demo and scripts/test: a project venv with fleetctl installed, and OpenSSH's
# server (the sandbox fleet is made of real sshd processes) installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_sshd() {
    command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]
}

if ! need_sshd || ! command -v ssh-keygen >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
    echo "bootstrap: installing openssh-server, openssh-client and iproute2 (the sandbox fleet runs real sshd)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends openssh-server openssh-client iproute2 >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import fleetctl" >/dev/null
