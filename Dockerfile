# walcast container image (used by docker-compose.yml; not built in CI here).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p walcast && cp target/release/walcast /walcast

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/walcast walcast \
    && install -d -o walcast -g walcast /var/lib/walcast/state
COPY --from=build /walcast /usr/local/bin/walcast
USER walcast
WORKDIR /var/lib/walcast
# The default pipeline.state_dir (mount a volume here); the second copy of the
# slot record lives in Kafka (pipeline.state_topic).
ENV STATE_DIRECTORY=/var/lib/walcast/state
ENTRYPOINT ["/usr/local/bin/walcast"]
CMD ["run", "--config", "/etc/walcast/walcast.toml"]
