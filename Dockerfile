# syntax=docker/dockerfile:1
#
# postbox: a release build in the Rust image, run from debian:bookworm-slim
# (same glibc) as an unprivileged user.
#
#   docker build -t postbox .
#   docker run --rm -e DATABASE_URL=postgres://… postbox migrate
#   docker run --rm -e DATABASE_URL=postgres://… -e POSTBOX_SIGNING_SECRET=whsec_… postbox   # worker
#
# RUST_VERSION picks the builder (Cargo.toml's rust-version is the minimum):
#   docker build --build-arg RUST_VERSION=1.85 -t postbox .

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# Only what the build needs (.dockerignore keeps the rest out): the
# migrations are embedded with include_str!.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
# The workspace's other members and the declared example must exist for
# Cargo to read the manifest (only the postbox binary is built).
COPY support ./support
COPY tools ./tools
COPY examples/enqueue/rust.rs ./examples/enqueue/rust.rs
# Cache mounts keep the crates index, downloads and build artifacts between
# builds; the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin postbox \
    && install -m 0755 target/release/postbox /usr/local/bin/postbox

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: the system roots that HTTPS deliveries are verified
# against (POSTBOX_CA_CERT adds more).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 postbox \
    && useradd --system --uid 10001 --gid postbox --home-dir /nonexistent --no-create-home \
               --shell /usr/sbin/nologin postbox
COPY --from=builder /usr/local/bin/postbox /usr/local/bin/postbox
# postbox reads a .env file from its working directory when there is one:
# an empty directory, so only the environment configures the container.
WORKDIR /srv/postbox
USER 10001:10001
# /metrics, /healthz and /readyz when POSTBOX_METRICS_ADDR=0.0.0.0:9090;
# 8000 is `postbox listen --addr 0.0.0.0:8000`.
EXPOSE 9090 8000
# The worker stops on SIGTERM: it finishes or releases in-flight deliveries
# within POSTBOX_SHUTDOWN_GRACE (30s) and exits 0. Give it longer than that
# before a SIGKILL (docker stop -t 45, compose stop_grace_period,
# Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["postbox"]
CMD ["worker"]
