# Build: docker build -t outrigger .
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin outrigger

FROM debian:bookworm-slim
RUN useradd --uid 2102 --no-create-home outrigger
COPY --from=build /src/target/release/outrigger /usr/local/bin/outrigger
COPY config /etc/outrigger
USER 2102
# outbound, inbound, probes, admin (loopback only)
EXPOSE 15001 15006 15020
ENTRYPOINT ["/usr/local/bin/outrigger"]
CMD ["run", "--config", "/etc/outrigger/sidecar.yaml"]
