#!/usr/bin/env bash
# The lease protocol's cost per event in PostgreSQL alone (no HTTP, one
# session): see sql/protocol_cost.sql. Needs psql, a superuser connection
# on this machine (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres)
# and a built postbox binary (POSTBOX_BIN, default target/release/postbox).
#
#   tools/bench/protocol-cost.sh [EVENTS] [ENDPOINTS] [BATCH...]
#   tools/bench/protocol-cost.sh 20000 1 16 32 100
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
bin="${POSTBOX_BIN:-$root/target/release/postbox}"
events="${1:-20000}"
endpoints="${2:-1}"
shift $(( $# >= 2 ? 2 : $# ))
batches=("${@:-32}")
db="protocol_cost_$$"
db_url="${url%/*}/$db"
trap 'psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1' EXIT
for batch in "${batches[@]}"; do
    psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
    DATABASE_URL="$db_url" "$bin" migrate >/dev/null
    psql -q -X -v ON_ERROR_STOP=1 -v events="$events" -v endpoints="$endpoints" -v batch="$batch" \
        -f "$here/sql/protocol_cost.sql" "$db_url" 2>&1 | sed -n 's/.*NOTICE: *//p'
done
