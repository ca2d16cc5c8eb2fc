#!/usr/bin/env bash
# Runs every fnrelay test on this machine. Installs (apt-get) and starts any
# local service the suite needs that is missing, then runs the whole suite
# with cargo-nextest (cargo test if nextest is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

sudo_cmd() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ensure_service NAME PORT DEBIAN_PACKAGE BINARY START_COMMAND
# Starts the service if nothing listens on PORT, installing the package
# first if BINARY is missing; waits up to 120 s for the port.
ensure_service() {
    local name=$1 port=$2 package=$3 binary=$4 start=$5
    if port_open "$port"; then return; fi
    echo "test.sh: $name is not listening on :$port; starting it" >&2
    if ! command -v "$binary" >/dev/null 2>&1 && [ ! -x "$binary" ]; then
        echo "test.sh: installing $package" >&2
        sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive sudo_cmd apt-get install -y -qq "$package"
    fi
    sudo_cmd bash -c "$start"
    for _ in $(seq 1 120); do
        if port_open "$port"; then return; fi
        sleep 1
    done
    echo "test.sh: $name did not come up on :$port" >&2
    exit 1
}

# The broker backends are tested against these real services.
ensure_service Redis 6379 redis-server redis-server \
    "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
ensure_service RabbitMQ 5672 rabbitmq-server rabbitmq-server \
    "rabbitmq-server -detached"
ensure_service Mosquitto 1883 mosquitto mosquitto \
    "mosquitto -d -c /etc/mosquitto/mosquitto.conf"
ensure_service "NATS (JetStream)" 4222 nats-server /usr/sbin/nats-server \
    "mkdir -p /var/lib/nats-server && start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server"

# PostgreSQL (the shared journal's tests): Debian's cluster, with trust
# auth for the postgres user over 127.0.0.1, as the tests connect.
PG_TRUST='v=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$v/main/pg_hba.conf
    grep -q "^host all postgres 127.0.0.1/32 trust" "$hba" ||
        sed -i "1i host all postgres 127.0.0.1/32 trust" "$hba"
    pg_ctlcluster "$v" main start || pg_ctlcluster "$v" main reload'
ensure_service PostgreSQL 5432 postgresql pg_ctlcluster "$PG_TRUST"
if ! PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -U postgres -w -tAc 'SELECT 1' >/dev/null 2>&1; then
    echo "test.sh: PostgreSQL refuses postgres@127.0.0.1 without a password; adding trust for it" >&2
    sudo_cmd bash -c "$PG_TRUST"
fi

# promtool (Debian's prometheus package) runs the alert rules' unit tests
# (tests/deploy.rs).
if ! command -v promtool >/dev/null 2>&1; then
    echo "test.sh: installing promtool (prometheus)" >&2
    sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive sudo_cmd apt-get install -y -qq --no-install-recommends prometheus
fi

# The benchmark harness is built (so it cannot rot) but not run here: it
# takes minutes and its figures belong in BENCHMARKS.md, not in a test.
cargo build --benches

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    # nextest does not run doctests.
    cargo test --workspace --doc
else
    cargo test --workspace --no-fail-fast
fi
