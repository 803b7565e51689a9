#!/usr/bin/env bash
# Development environment for Sluice: dependencies, the extension, and a project-local cluster.
#
#   scripts/dev.sh deps      install what is missing (Debian packages, cargo-pgrx, pgrx init)
#   scripts/dev.sh install   build the extension (release) and install it into the system PG15
#   scripts/dev.sh start     create (once) and start the cluster under target/, create the database
#   scripts/dev.sh stop      stop the cluster
#   scripts/dev.sh restart   restart it (picks up a newly installed library)
#   scripts/dev.sh psql      open psql on the cluster
#
# Environment: SLUICE_PORT (28815), SLUICE_CLUSTER_DIR (target/sluice-cluster), SLUICE_DB (sluice).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG="$PG_BIN/pg_config"
PGRX_VERSION=0.18.0
PORT="${SLUICE_PORT:-28815}"
CLUSTER="${SLUICE_CLUSTER_DIR:-$ROOT/target/sluice-cluster}"
DB="${SLUICE_DB:-sluice}"
DATA="$CLUSTER/data"
SOCK="$CLUSTER/run"
LOG="$CLUSTER/postgres.log"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
as_postgres() { runuser -u postgres -- "$@"; }

deps() {
    local missing=()
    for pkg in postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
    fi
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        say "installing cargo-pgrx $PGRX_VERSION (several minutes, once)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    if ! grep -qs "^pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        say "pointing pgrx at the system PostgreSQL 15"
        cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
    fi
}

install() {
    say "building the sluice extension"
    local stage="$ROOT/target/sluice-package"
    rm -rf "$stage"
    (cd "$ROOT/extension" && cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$stage" >/dev/null)
    # Copy only what changed, each as a new file (install unlinks first): a running server that
    # has the old library mapped keeps it intact. A changed library needs a restart to load.
    local changed_library=0 src dst
    while IFS= read -r -d '' src; do
        dst="/${src#"$stage"/}"
        if ! cmp -s "$src" "$dst"; then
            command install -D -m 0755 "$src" "$dst"
            [[ "$dst" == *.so ]] && changed_library=1
            # Same version, new SQL (development): ALTER EXTENSION UPDATE would be a no-op, so
            # the next start recreates the project database. Compared with the last release
            # install, not with the installed file, which `cargo pgrx test` overwrites.
            if [[ "$dst" == *.sql ]] && ! cmp -s "$src" "$CLUSTER/installed-sql/${dst##*/}"; then
                mkdir -p "$CLUSTER/installed-sql"
                cp "$src" "$CLUSTER/installed-sql/${dst##*/}"
                touch "$CLUSTER/recreate-extension"
            fi
            say "installed $dst"
        fi
    done < <(find "$stage" -type f -print0)
    if ((changed_library)) && running; then
        say "library changed: restarting the cluster"
        stop
        start
    fi
}

running() { [ -f "$DATA/postmaster.pid" ] && as_postgres "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

start() {
    mkdir -p "$CLUSTER" "$SOCK"
    chown postgres:postgres "$CLUSTER" "$SOCK"
    if [ ! -f "$DATA/PG_VERSION" ]; then
        say "creating cluster in $DATA (port $PORT)"
        as_postgres "$PG_BIN/initdb" -D "$DATA" -U postgres -A trust --no-instructions >/dev/null
        cat >> "$DATA/postgresql.conf" <<CONF

# --- sluice development cluster ---
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
shared_preload_libraries = 'sluice'
sluice.database = '$DB'
max_connections = 300
shared_buffers = 512MB
fsync = on
synchronous_commit = on
log_min_messages = warning
log_line_prefix = '%m [%p] %b '
CONF
    fi
    if ! running; then
        say "starting PostgreSQL on port $PORT"
        as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null
    fi
    if ! as_postgres "$PG_BIN/psql" -h "$SOCK" -p "$PORT" -d postgres -Atqc \
            "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
        as_postgres "$PG_BIN/createdb" -h "$SOCK" -p "$PORT" "$DB"
    fi
    if [ -f "$CLUSTER/recreate-extension" ]; then
        # Task ids would start over while tables outside the extension (the demo's, the tests')
        # kept rows keyed by them: start from a fresh project database instead.
        say "extension SQL changed without a version bump: recreating database \"$DB\""
        # The scheduler, restarted a second after --force ends it, can connect again before
        # the drop: try a few times.
        local tries=0
        until as_postgres "$PG_BIN/dropdb" -h "$SOCK" -p "$PORT" --force --if-exists "$DB"; do
            tries=$((tries + 1))
            ((tries < 5)) || return 1
            sleep 1
        done
        as_postgres "$PG_BIN/createdb" -h "$SOCK" -p "$PORT" "$DB"
        rm -f "$CLUSTER/recreate-extension"
    fi
    # After a reinstall the SQL may be newer than the installed extension: update in place.
    as_postgres "$PG_BIN/psql" -h "$SOCK" -p "$PORT" -d "$DB" -qAtc \
        "SET client_min_messages = warning; CREATE EXTENSION IF NOT EXISTS sluice; ALTER EXTENSION sluice UPDATE;" >/dev/null
}

stop() {
    if running; then
        say "stopping PostgreSQL on port $PORT"
        as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
}

case "${1:-}" in
    deps) deps ;;
    install) install ;;
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    psql) shift; exec "$PG_BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d "$DB" "$@" ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
esac
