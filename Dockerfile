# walcast container image (docker-compose.yml builds it; see docs/operations.md,
# "Deploying"). Runs as the non-root user walcast (uid/gid 10001) with its state
# in /var/lib/walcast/state, a directory the image creates and gives to that
# user, so a volume mounted there (docker and podman copy the image's ownership
# into a new named volume) is writable. A bind mount must be owned by 10001.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p walcast && cp target/release/walcast /walcast

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 walcast \
    && useradd --system --uid 10001 --gid walcast --home-dir /var/lib/walcast --no-create-home --shell /usr/sbin/nologin walcast \
    && install -d -o walcast -g walcast -m 0750 /var/lib/walcast /var/lib/walcast/state \
    && install -d -m 0755 /etc/walcast
COPY --from=build /walcast /usr/local/bin/walcast
USER walcast:walcast
WORKDIR /var/lib/walcast
# The default pipeline.state_dir (mount a volume here); the second copy of the
# slot record lives in Kafka (pipeline.state_topic).
ENV STATE_DIRECTORY=/var/lib/walcast/state
VOLUME ["/var/lib/walcast/state"]
# [metrics] listen = "0.0.0.0:9187": /metrics, /healthz, /readyz
EXPOSE 9187
STOPSIGNAL SIGTERM
# No curl in the image: walcast checks itself. Ready = streaming from the slot,
# producer connected, not stalled (docs/metrics.md).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/walcast", "health", "--url", "http://127.0.0.1:9187/readyz"]
ENTRYPOINT ["/usr/local/bin/walcast"]
CMD ["run", "--config", "/etc/walcast/walcast.toml"]
