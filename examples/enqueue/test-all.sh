#!/usr/bin/env bash
# Runs the enqueue examples, each against a fresh database with postbox's
# migrations applied, and checks the outcome with psql: the committed event
# and its message row exist, the rolled-back ones do not, the invalid status
# is reported as data.status, and a refused callback URL as callback_url with
# nothing written.
#
# Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres examples/enqueue/test-all.sh [LANGUAGE...]
#   LANGUAGE: python node java go php rust (default: all of them)
# DATABASE_URL's user must be allowed to CREATE DATABASE. Missing Debian
# packages (psql, Java, Go with lib/pq, PHP with pdo_pgsql) are installed with
# apt-get (as root, or through sudo); psycopg and pg go under target/tmp/.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
deps="${CARGO_TARGET_DIR:-$root/target}/tmp/enqueue-examples"
: "${DATABASE_URL:?set DATABASE_URL to a database whose user may CREATE DATABASE}"
unset CALLBACK_URL
if [ $# -gt 0 ]; then languages=("$@"); else languages=(python node java go php rust); fi

conversation=5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10
rejected='rejected: invalid data.status: must be one of RECEIVED, PROCESSED, FAILED (got "DONE")'
bad_url=ftp://customer.example.com/webhook
bad_url_error='invalid callback_url: must be an absolute https:// URL'

# --- Debian packages -------------------------------------------------------
packages=()
want() { packages+=("$@"); }
command -v psql >/dev/null || want postgresql-client
for lang in "${languages[@]}"; do
    case $lang in
        java)
            command -v java >/dev/null || want default-jdk-headless
            [ -f /usr/share/java/postgresql.jar ] || want libpostgresql-jdbc-java ;;
        go)
            command -v go >/dev/null || want golang-go
            [ -d /usr/share/gocode/src/github.com/lib/pq ] || want golang-github-lib-pq-dev ;;
        php)
            command -v php >/dev/null || want php-cli
            php -m 2>/dev/null | grep -qx pdo_pgsql || want php-pgsql ;;
        python|node|rust) ;;
        *) echo "unknown language: $lang (python node java go php rust)" >&2; exit 2 ;;
    esac
done
if [ ${#packages[@]} -gt 0 ]; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing ${packages[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# --- how to run each example --------------------------------------------------
prepare() {
    case $1 in
        python)
            if ! PYTHONPATH="$deps/python" python3 -c 'import psycopg' 2>/dev/null; then
                python3 -m pip install -q --disable-pip-version-check --target "$deps/python" \
                    -r "$here/python/requirements.txt"
            fi ;;
        node)
            if ! cmp -s "$here/node/package-lock.json" "$deps/node/package-lock.json" \
                || [ ! -d "$deps/node/node_modules/pg" ]; then
                mkdir -p "$deps/node"
                cp "$here/node/package.json" "$here/node/package-lock.json" "$deps/node/"
                (cd "$deps/node" && npm ci --no-audit --no-fund --loglevel=error)
            fi ;;
        rust) (cd "$root" && cargo build --quiet --example enqueue) ;;
        *) ;;
    esac
}

run_example() {
    case $1 in
        python) PYTHONPATH="$deps/python" python3 "$here/python/enqueue.py" ;;
        node) NODE_PATH="$deps/node/node_modules" node "$here/node/enqueue.js" ;;
        java) java -cp /usr/share/java/postgresql.jar "$here/java/Enqueue.java" ;;
        go) (cd "$here/go" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$deps/go-cache" go run main.go) ;;
        php) php "$here/php/enqueue.php" ;;
        rust) "${CARGO_TARGET_DIR:-$root/target}/debug/examples/enqueue" ;;
    esac
}

# DATABASE_URL with its database name replaced by $1.
database_url() {
    local base=${DATABASE_URL%%\?*} query=""
    [ "$base" = "$DATABASE_URL" ] || query="?${DATABASE_URL#*\?}"
    if [[ $base =~ ^[a-z]+://[^/]*$ ]]; then base="$base/"; else base="${base%/*}/"; fi
    echo "$base$1$query"
}

# --- one example ----------------------------------------------------------------
failures=()
fail() { echo "  FAIL: $*"; ok=false; }

check() {
    local lang=$1 db="postbox_example_${1}_$$" url out err event message undone undone_message
    url=$(database_url "$db")
    ok=true
    echo "== $lang"
    prepare "$lang"
    psql -qX -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    for f in "$root"/migrations/*.sql; do
        psql -qX -v ON_ERROR_STOP=1 --single-transaction -f "$f" "$url" >/dev/null
    done
    q() { psql -qXAt -v ON_ERROR_STOP=1 "$url" -c "$1"; }

    out=$(mktemp) err=$(mktemp)
    if ! DATABASE_URL=$url run_example "$lang" >"$out" 2>"$err"; then
        fail "the example exited non-zero"
    fi
    sed 's/^/  | /' "$out" "$err"
    read -r event message < <(sed -n 's/^committed event \([0-9a-f-]*\) (message \([0-9a-f-]*\)).*/\1 \2/p' "$out") || true
    read -r undone undone_message < <(sed -n 's/^rolled back event \([0-9a-f-]*\) (message \([0-9a-f-]*\)).*/\1 \2/p' "$out") || true

    if [ -z "${event:-}" ]; then
        fail "no committed event printed"
    else
        [ "$(q "SELECT count(*) FROM postbox.outbox WHERE id = '$event' AND message_id = '$message'
                 AND conversation_id = '$conversation' AND ordering_key = '$conversation'
                 AND status = 'pending' AND payload #>> '{data,content}' = 'Hello'")" = 1 ] \
            || fail "committed event $event is not pending in the outbox with its message"
        [ "$(q "SELECT count(*) FROM example_app.messages WHERE id = '$message'")" = 1 ] \
            || fail "committed message $message has no row"
    fi
    if [ -z "${undone:-}" ]; then
        fail "no rolled-back event printed"
    else
        [ "$(q "SELECT count(*) FROM postbox.outbox WHERE id = '$undone'")" = 0 ] \
            || fail "rolled-back event $undone is in the outbox"
        [ "$(q "SELECT count(*) FROM example_app.messages WHERE id = '$undone_message'")" = 0 ] \
            || fail "rolled-back message $undone_message has a row"
    fi
    grep -qxF "$rejected" "$out" || fail "no line: $rejected"
    [ "$(q "SELECT count(*) FROM postbox.outbox") $(q "SELECT count(*) FROM example_app.messages")" = "1 1" ] \
        || fail "expected exactly one event and one message row"

    if DATABASE_URL=$url CALLBACK_URL=$bad_url run_example "$lang" >"$out" 2>"$err"; then
        fail "CALLBACK_URL=$bad_url was accepted"
    fi
    grep -qxF "$bad_url_error" "$err" || fail "CALLBACK_URL=$bad_url: no '$bad_url_error' on stderr"
    [ "$(q "SELECT count(*) FROM postbox.outbox") $(q "SELECT count(*) FROM example_app.messages")" = "1 1" ] \
        || fail "the refused callback URL left rows behind"

    rm -f "$out" "$err"
    psql -qX "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
    if $ok; then echo "  ok"; else failures+=("$lang"); fi
}

for lang in "${languages[@]}"; do
    check "$lang"
done
echo "$(( ${#languages[@]} - ${#failures[@]} )) passed, ${#failures[@]} failed"
[ ${#failures[@]} -eq 0 ]
