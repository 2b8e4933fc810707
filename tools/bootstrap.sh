#!/usr/bin/env bash
# Install what netweaver-agent needs on a fresh Debian 12 machine, as root:
# the kernel tools the lab and the tests drive (iproute2, iptables, tcpdump,
# ethtool, openssh-server, libvirt for its test:/// driver, Open vSwitch and OVN whose
# daemons the lab runs privately in its namespaces), the headers that
# libvirt-python and NetfilterQueue build against (and gcc with Python's
# headers, which also build our C loops: the capture reader's, _pcapwalk,
# the sender's, _sendloop, and the probe builder's, _probebuild), and a
# venv at .venv with the package installed in editable mode.  Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iptables tcpdump openssh-server openssh-client
              libvirt0 libvirt-dev libvirt-clients pkg-config gcc python3-dev
              libnetfilter-queue-dev libnfnetlink-dev procps kmod hping3
              openvswitch-switch ovn-central ovn-host sudo passwd ethtool)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: these Debian packages are missing and installing" \
             "them needs root: ${missing[*]}" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's postinst scripts would start host-wide daemons (Open vSwitch,
    # OVN, sshd...): forbid it for this install (policy-rc.d exit 101).  The
    # lab starts its own private ovsdb-server/ovs-vswitchd/OVN daemons
    # inside its namespaces and must never depend on a host-wide one.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    status=0
    apt-get update -qq || status=$?
    if [ "$status" -eq 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >/dev/null || status=$?
    fi
    if [ -n "$made_policy" ]; then
        rm -f "$policy"
    fi
    [ "$status" -eq 0 ] || exit "$status"
    # Whatever started anyway (a postinst ignoring the policy) is stopped:
    # host-wide daemons keep their pidfiles in /run/openvswitch, /run/ovn.
    for pidfile in /run/openvswitch/*.pid /run/ovn/*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            echo "bootstrap: stopping host-wide $(basename "$pidfile" .pid)" \
                 "(pid $pid) started by its package" >&2
            kill "$pid" || true
        fi
    done
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.netweaver-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] \
        || [ setup.py -nt "$stamp" ] \
        || [ netweaver_agent/core/_pcapwalk.c -nt "$stamp" ] \
        || [ netweaver_agent/core/_sendloop.c -nt "$stamp" ] \
        || [ netweaver_agent/core/_probebuild.c -nt "$stamp" ] \
        || [ requirements.txt -nt "$stamp" ] \
        || [ test-requirements.txt -nt "$stamp" ]; then
    echo "bootstrap: installing Python packages into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -r requirements.txt -r test-requirements.txt
    .venv/bin/pip install -q --no-deps -e .
    touch "$stamp"
fi
