#!/usr/bin/env bash
# Install what the telemetry pipeline of `netweaver lab --pipeline` and
# tests/functional/test_pipeline.py needs, as root, on top of
# tools/bootstrap.sh: the Debian packages rabbitmq-server, postgresql and
# prometheus (with promtool), and two venvs under the clone (git-ignored):
# .venv-gnocchi (Gnocchi 4.7.1, gnocchiclient) and .venv-aodh
# (Aodh 23 with psycopg).  The venvs are built while apt runs.  No service
# is started here (a policy-rc.d forbids it during the install; anything
# a postinst started anyway is stopped): the lab and the tests start each
# daemon themselves, by pid, inside their own namespaces.  Safe to run
# again: it only installs what is missing, and prints how long each part
# took.
set -euo pipefail
cd "$(dirname "$0")/.."

# uwsgi from Debian (with its http and python3 plugins) serves Gnocchi's
# API: building uwsgi from PyPI took minutes of the CI budget.
APT_PACKAGES=(rabbitmq-server postgresql prometheus uwsgi-core
              uwsgi-plugin-python3 python3-venv)
GNOCCHI_PACKAGES=('gnocchi[postgresql,file]==4.7.1' 'gnocchiclient'
                  'setuptools<81')
AODH_PACKAGES=('aodh>=23,<24' 'psycopg[binary]' 'setuptools<81')
PYTHON=${PYTHON:-python3}
t0=$SECONDS

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "pipeline-bootstrap: $1 needs root" >&2
        exit 1
    fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$pkg")
done

# Pids of the daemons the packages of this install could start.
daemon_pids() {
    local name
    for name in epmd beam.smp prometheus postgres; do
        pgrep -x "$name" || true
    done | tr '\n' ' '
}

apt_install() {
    local start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    local policy=/usr/sbin/policy-rc.d made_policy= status=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    local before
    before=" $(daemon_pids) "
    apt-get -o DPkg::Lock::Timeout=300 update -qq || status=$?
    if [ "$status" -eq 0 ]; then
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null || status=$?
    fi
    if [ -n "$made_policy" ]; then
        rm -f "$policy"
    fi
    # A postinst that started a host-wide daemon anyway: stop it (only what
    # appeared during this install).  The lab and the tests run their own
    # inside namespaces, never in this one.
    local pid here
    here=$(readlink /proc/self/ns/net)
    for pid in $(daemon_pids); do
        case "$before" in *" $pid "*) continue ;; esac
        if [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" = "$here" ]; then
            echo "pipeline-bootstrap: stopping host-wide" \
                 "$(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) started" \
                 "by its package" >&2
            kill "$pid" 2>/dev/null || true
        fi
    done
    echo "pipeline-bootstrap: apt ${missing[*]}: $((SECONDS - start)) s"
    return "$status"
}

# venv DIR STAMP PACKAGES...: build DIR unless STAMP says it holds PACKAGES.
venv() {
    local dir=$1; shift
    local want="$*" start=$SECONDS
    if [ -x "$dir/bin/python" ] && [ -f "$dir/.netweaver-installed" ] \
            && [ "$(cat "$dir/.netweaver-installed")" = "$want" ]; then
        return 0
    fi
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@" \
        > "$dir.log" 2>&1 || {
        echo "pipeline-bootstrap: pip install into $dir failed:" >&2
        tail -20 "$dir.log" >&2
        return 1
    }
    rm -f "$dir.log"
    echo "$want" > "$dir/.netweaver-installed"
    echo "pipeline-bootstrap: $dir: $((SECONDS - start)) s"
}

pids=()
if [ "${#missing[@]}" -gt 0 ]; then
    need_root "installing ${missing[*]}"
    echo "pipeline-bootstrap: installing ${missing[*]}"
    apt_install &
    pids+=($!)
fi
# The venvs need no package of this apt run (wheels only; the Debian
# python3 that tools/bootstrap.sh uses), so they are built meanwhile.
venv .venv-gnocchi "${GNOCCHI_PACKAGES[@]}" &
pids+=($!)
venv .venv-aodh "${AODH_PACKAGES[@]}" &
pids+=($!)
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
[ "$status" -eq 0 ] || exit "$status"
for tool in /usr/lib/rabbitmq/bin/rabbitmq-server /usr/bin/prometheus \
            /usr/bin/promtool /usr/bin/uwsgi-core \
            .venv-gnocchi/bin/gnocchi-upgrade \
            .venv-aodh/bin/aodh-evaluator; do
    [ -x "$tool" ] || { echo "pipeline-bootstrap: $tool is missing" >&2
                        exit 1; }
done
if [ $((SECONDS - t0)) -gt 1 ]; then
    echo "pipeline-bootstrap: done in $((SECONDS - t0)) s"
fi
