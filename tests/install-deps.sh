#!/usr/bin/env bash
# What `make test` needs beyond the Rust toolchain, installed when missing: quick and silent when
# everything is there, so `make test` runs it every time. As root with apt-get (a fresh machine,
# CI) it installs; otherwise it names what is missing and how to install it, and fails.
set -euo pipefail
cd "$(dirname "$0")/.."

apt=()        # installed with their recommends
apt_slim=()   # installed without: a desktop's worth of recommends otherwise
command -v kill >/dev/null || apt+=(procps)                 # the CLI tests send signals with kill(1)
command -v cc >/dev/null || apt+=(gcc)                      # ring builds a little C
command -v curl >/dev/null || apt+=(curl)                   # the README's snippets run against the demo
command -v openssl >/dev/null || apt+=(openssl)             # tests/workload_identity.rs: RSA keys
command -v systemd-analyze >/dev/null || apt+=(systemd)     # verifies deploy/systemd
command -v node >/dev/null || apt+=(nodejs)                 # runs docs/examples/token-client.mjs
command -v redis-server >/dev/null || apt+=(redis-server)   # tests/shared_cache.rs starts its own
command -v redis-cli >/dev/null || apt+=(redis-tools)       # tests/redis_modes.rs: redis-cli --cluster create
command -v valgrind >/dev/null || apt+=(valgrind)           # make test-instructions: callgrind
command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || apt+=(python3-pip)
command -v promtool >/dev/null || apt_slim+=(prometheus)    # tests/observability.rs: rules, metrics
command -v chromium >/dev/null || apt_slim+=(chromium fonts-liberation)  # the status page test

if ((${#apt[@]} + ${#apt_slim[@]})); then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "make test needs: ${apt[*]} ${apt_slim[*]}" >&2
        echo "install them with: sudo apt-get install ${apt[*]} ${apt_slim[*]}" >&2
        exit 1
    fi
    echo "installing what the tests need: ${apt[*]} ${apt_slim[*]}"
    apt-get update -qq
    if ((${#apt[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt[@]}" >/dev/null
    fi
    if ((${#apt_slim[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_slim[@]}" >/dev/null
    fi
    # The tests start redis-server themselves on free ports: if installing the package started
    # the system's Redis service, stop it again.
    if [[ " ${apt[*]} " == *" redis-server "* ]]; then
        if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
            systemctl stop redis-server || true
        elif [ -x /etc/init.d/redis-server ] && /etc/init.d/redis-server status >/dev/null 2>&1; then
            /etc/init.d/redis-server stop || true
        fi
    fi
    # Only promtool is wanted from the prometheus package: if installing it started the
    # Prometheus server (where packages may start services), stop it again.
    if [[ " ${apt_slim[*]} " == *" prometheus "* ]]; then
        if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
            systemctl stop prometheus || true
        elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
            /etc/init.d/prometheus stop || true
        fi
    fi
fi

# tests/py: exact pins, the packages they pull in included. Nothing is fetched when they are
# all installed already.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -r tests/py/requirements.txt
