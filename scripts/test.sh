#!/usr/bin/env bash
# Runs every fnrelay test on this machine. Installs (apt-get) and starts any
# local service the suite needs that is missing, then runs the whole suite
# with cargo-nextest (cargo test if nextest is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."

# Services the suite talks to: "name port debian-package start-command".
# The core suite needs none; broker backends add theirs here.
SERVICES=()

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_service() {
    local name=$1 port=$2 package=$3 start=$4
    if port_open "$port"; then return; fi
    echo "test.sh: $name is not listening on :$port; starting it" >&2
    if ! command -v "${start%% *}" >/dev/null 2>&1; then
        echo "test.sh: installing $package" >&2
        sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive sudo_cmd apt-get install -y -qq "$package"
    fi
    sudo_cmd bash -c "$start"
    for _ in $(seq 1 60); do
        if port_open "$port"; then return; fi
        sleep 1
    done
    echo "test.sh: $name did not come up on :$port" >&2
    exit 1
}

sudo_cmd() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

for spec in "${SERVICES[@]+"${SERVICES[@]}"}"; do
    # shellcheck disable=SC2086
    eval ensure_service $spec
done

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    # nextest does not run doctests.
    cargo test --workspace --doc
else
    cargo test --workspace --no-fail-fast
fi
