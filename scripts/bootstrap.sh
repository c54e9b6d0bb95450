#!/usr/bin/env bash
# Shared by scripts/demo and scripts/test: a project venv with fleetctl installed, and OpenSSH's
# server (the sandbox fleet is made of real sshd processes) installed when missing.
# --with-prometheus (scripts/test only): also Debian's prometheus, which the suite starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_PROMETHEUS=0
for arg in "$@"; do
    case "$arg" in
        --with-prometheus) WITH_PROMETHEUS=1 ;;
        *) echo "bootstrap: unknown argument $arg" >&2; exit 2 ;;
    esac
done

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

if [ "$WITH_PROMETHEUS" -eq 1 ] && ! command -v prometheus >/dev/null 2>&1; then
    echo "bootstrap: installing prometheus (the metrics test scrapes serve with a real server)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    # The package's postinst starts a system prometheus on :9090 (invoke-rc.d runs the init script
    # when systemd is not running). The tests start their own on a free port, so a policy-rc.d
    # that answers 101 ("not allowed") keeps the service from starting; ours only, removed after.
    POLICY=/usr/sbin/policy-rc.d
    OWN_POLICY=0
    drop_policy() {
        if [ "$OWN_POLICY" -eq 1 ]; then
            $SUDO rm -f "$POLICY"
            OWN_POLICY=0
        fi
    }
    if [ ! -e "$POLICY" ]; then
        trap drop_policy EXIT  # removed even when apt fails
        OWN_POLICY=1
        $SUDO sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
    fi
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    drop_policy
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import fleetctl" >/dev/null
