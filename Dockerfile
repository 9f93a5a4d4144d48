# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, run on a slim Debian as a non-root user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
# The workspace's members (benchmark, test kit) must be present for cargo to read the
# workspace, but only the service is built.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY crates ./crates
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked -p loyalty --bin loyalty || true
COPY migrations ./migrations
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p loyalty --bin loyalty

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin loyalty
COPY --from=build /src/target/release/loyalty /usr/local/bin/loyalty
USER 10001:10001
ENV LOYALTY_LISTEN=0.0.0.0:50051 \
    LOYALTY_METRICS_LISTEN=0.0.0.0:9464 \
    LOYALTY_LOG_FORMAT=json \
    LOYALTY_HEALTH_ENDPOINT=http://127.0.0.1:50051
EXPOSE 50051 9464
# gRPC health check against the server itself (grpc.health.v1, overall status). The endpoint
# comes from LOYALTY_HEALTH_ENDPOINT, so a TLS deployment sets it (and LOYALTY_HEALTH_CA_CERT,
# LOYALTY_HEALTH_TLS_DOMAIN) rather than rewriting the check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/loyalty", "health"]
ENTRYPOINT ["/usr/local/bin/loyalty"]
CMD ["serve"]
