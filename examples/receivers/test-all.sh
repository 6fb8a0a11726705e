#!/usr/bin/env bash
# Runs every example receiver against a real `postbox worker`, including the
# plain-Java and PHP ones that plain `cargo test` skips (#[ignore]): installs
# a JDK and php-cli with pdo_sqlite from Debian's packages when missing.
# The Python and Node packages are installed by the tests themselves (PyPI
# into target/, npm into express/node_modules).
#
#   examples/receivers/test-all.sh            # every receiver
#   examples/receivers/test-all.sh php        # only the tests matching "php"
#
# Uses DATABASE_URL when set (as `cargo test` does), else a throwaway cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

need=()
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
command -v php >/dev/null 2>&1 || need+=(php-cli)
php -r 'exit(extension_loaded("pdo_sqlite") ? 0 : 1);' >/dev/null 2>&1 || need+=(php-sqlite3)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --test examples_receivers -- --include-ignored "$@"
