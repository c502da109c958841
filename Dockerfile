# syntax=docker/dockerfile:1
# ordercast: multi-stage build, slim non-root runtime image.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# librdkafka is compiled from source by rdkafka-sys (configure + make), with
# OpenSSL for TLS and SASL/SCRAM brokers.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential python3 libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY sql ./sql
# The Kafka event schemas are compiled into the binary.
COPY schemas ./schemas
COPY web ./web
RUN cargo build --release --locked --bin ordercast

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app ordercast
COPY --from=builder /src/target/release/ordercast /usr/local/bin/ordercast
USER ordercast
WORKDIR /app
# In a container, listen on all interfaces; DATABASE_URL must point at PostgreSQL.
ENV ORDERCAST_BIND=0.0.0.0:8080 RUST_LOG=info
EXPOSE 8080
# Liveness: whether the server answers, on ORDERCAST_BIND's port (a database
# or Kafka outage shows in /api/health's 503, which a restart would not mend).
# The start period covers the migrations, which may wait for another
# replica's.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${ORDERCAST_BIND##*:}/api/health/live" || exit 1
ENTRYPOINT ["ordercast"]
CMD ["serve"]
