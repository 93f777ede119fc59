# syntax=docker/dockerfile:1
#
# mirror-mirror: `docker build -t mirror-mirror .` from the repository root.
# Two stages: a Rust builder, then a small Debian runtime with CA certificates and a non-root user.
# See deploy/README.md for running it (compose, Kubernetes) and for what is checked without a Docker engine.

# ---- builder ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /app

# Dependencies first, against stub sources, so this layer is reused while only src/ changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. `sqlx::migrate!` embeds migrations/ and askama embeds templates/ at compile
# time, so they must be here too.
# COPY keeps the context's modification times, which can be older than the stubs above: touch the
# crate roots so cargo rebuilds the crate instead of shipping the stub binary.
COPY src ./src
COPY migrations ./migrations
COPY templates ./templates
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && ./target/release/mirror-mirror --version | grep -q '^mirror-mirror '

# ---- runtime ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: registries are reached over TLS; curl: the HEALTHCHECK below.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mirror \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin mirror \
 && mkdir -p /data \
 && chown 10001:10001 /data

COPY --from=builder /app/target/release/mirror-mirror /usr/local/bin/mirror-mirror

# The SQLite queue and ledger live on the /data volume (with their -wal and -shm files).
# Registry credentials: mount a Docker config.json at /config/docker/config.json (or set REGISTRY_AUTH_FILE).
ENV MIRROR_LISTEN=0.0.0.0:8080 \
    MIRROR_DATABASE=/data/mirror-mirror.db \
    DOCKER_CONFIG=/config/docker
VOLUME ["/data"]
WORKDIR /data
EXPOSE 8080

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# The port follows MIRROR_LISTEN if it is overridden at run time.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD curl -fsS -o /dev/null "http://127.0.0.1:${MIRROR_LISTEN##*:}/healthz" || exit 1

# SIGTERM (the default stop signal) lets running copies finish for MIRROR_SHUTDOWN_GRACE (30 s):
# give `docker stop` more than that, e.g. `docker stop -t 45`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mirror-mirror"]
CMD ["serve"]
