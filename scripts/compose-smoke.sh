#!/usr/bin/env bash
# Smoke test of compose.yaml: build the image, start everything, wait until
# the listen service has printed every enqueued webhook with a valid
# signature, check the migration and the enqueue exited 0, the worker's
# /readyz, and that the worker stops cleanly (exit 0) on SIGTERM; then tear
# everything down (containers, network, volume), whatever happened.
#
#   scripts/compose-smoke.sh
#
# Needs Docker with the compose plugin (or docker-compose) and access to the
# rust, debian and postgres images. Environment:
#   POSTBOX_SMOKE_TIMEOUT   seconds to wait for the webhooks (default 600,
#                           the first build compiles everything)
#   POSTBOX_SMOKE_PROJECT   compose project name (default postbox-smoke)
#   POSTBOX_METRICS_PORT    host port of the worker's /readyz (default 9090)
#   POSTBOX_COMPOSE_SUBNET  the compose network (default 172.29.71.0/24)
set -euo pipefail
cd "$(dirname "$0")/.."

want=5 # compose.yaml's enqueue service: --count 5
timeout=${POSTBOX_SMOKE_TIMEOUT:-600}
project=${POSTBOX_SMOKE_PROJECT:-postbox-smoke}
port=${POSTBOX_METRICS_PORT:-9090}

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "compose-smoke: neither 'docker compose' nor docker-compose is installed" >&2
    exit 2
fi
dc() { "${compose[@]}" -p "$project" -f compose.yaml "$@"; }

# The exit code of a service's (first) container, or "" while it runs.
exit_code() {
    local id
    id=$(dc ps -a -q "$1" | head -n 1)
    [ -n "$id" ] || return 0
    if [ "$(docker inspect -f '{{.State.Running}}' "$id")" = "false" ]; then
        docker inspect -f '{{.State.ExitCode}}' "$id"
    fi
}

fail() {
    echo "compose-smoke: FAILED: $*" >&2
    dc ps -a >&2 || true
    dc logs --no-color --tail 100 >&2 || true
    exit 1
}

cleanup() { dc down --volumes --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

echo "compose-smoke: building the image"
dc build
echo "compose-smoke: starting the services"
dc up -d

deadline=$((SECONDS + timeout))
valid=0
while :; do
    logs=$(dc logs --no-color listen 2>/dev/null || true)
    valid=$(grep -c 'signature valid' <<<"$logs" || true)
    if grep -q 'SIGNATURE INVALID' <<<"$logs"; then
        fail "the receiver saw a webhook whose signature does not verify"
    fi
    for svc in migrate enqueue; do
        code=$(exit_code "$svc")
        if [ -n "$code" ] && [ "$code" != 0 ]; then
            fail "the $svc service exited $code"
        fi
    done
    if [ "$valid" -ge "$want" ]; then
        break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        fail "$valid of $want signed webhooks arrived within ${timeout}s"
    fi
    sleep 2
done
echo "compose-smoke: $valid webhooks arrived with a valid signature"

[ "$(exit_code migrate)" = 0 ] || fail "the migrate service did not exit 0"
[ "$(exit_code enqueue)" = 0 ] || fail "the enqueue service did not exit 0"

if command -v curl >/dev/null 2>&1; then
    ready=$(curl -fsS "http://127.0.0.1:${port}/readyz") || fail "the worker's /readyz did not answer 200"
    [ "$ready" = ready ] || fail "/readyz answered: $ready"
    echo "compose-smoke: /readyz says ready"
fi

echo "compose-smoke: stopping the worker (SIGTERM)"
dc stop worker
[ "$(exit_code worker)" = 0 ] || fail "the worker exited $(exit_code worker) on SIGTERM, not 0"

dc logs --no-color listen | grep 'signature valid'
echo "compose-smoke: OK"
