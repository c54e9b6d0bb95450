#!/usr/bin/env bash
# Shared by scripts/demo and scripts/test: a project venv with fleetctl installed, and OpenSSH's
# server (the sandbox fleet is made of real sshd processes) installed when missing.
# --with-prometheus (scripts/test only): also Debian's prometheus, which the suite starts itself.
# --with-postgres (scripts/test only): also PostgreSQL's server (initdb, pg_ctl); the suite starts
# private clusters itself, so the package's own cluster is neither created nor started.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_PROMETHEUS=0
WITH_POSTGRES=0
for arg in "$@"; do
    case "$arg" in
        --with-prometheus) WITH_PROMETHEUS=1 ;;
        --with-postgres) WITH_POSTGRES=1 ;;
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

have_initdb() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if [ "$WITH_POSTGRES" -eq 1 ] && ! have_initdb; then
    echo "bootstrap: installing postgresql (the store tests run a private PostgreSQL cluster)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    # postgresql-common's postinst creates a "main" cluster and starts it on :5432 (invoke-rc.d runs
    # the init script without systemd). create_main_cluster = false stops the first; a policy-rc.d
    # answering 101 ("not allowed") the second. Both ours only: removed after.
    POLICY=/usr/sbin/policy-rc.d
    CREATECLUSTER=/etc/postgresql-common/createcluster.d/fleetctl-no-main.conf
    OWN_PG_POLICY=0
    drop_pg_policy() {
        if [ "$OWN_PG_POLICY" -eq 1 ]; then
            $SUDO rm -f "$POLICY"
            OWN_PG_POLICY=0
        fi
        $SUDO rm -f "$CREATECLUSTER"
    }
    trap drop_pg_policy EXIT  # removed even when apt fails
    if [ ! -e "$POLICY" ]; then
        OWN_PG_POLICY=1
        $SUDO sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
    fi
    $SUDO mkdir -p "$(dirname "$CREATECLUSTER")"
    $SUDO sh -c "echo 'create_main_cluster = false' > $CREATECLUSTER"
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    drop_pg_policy
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import fleetctl" >/dev/null
