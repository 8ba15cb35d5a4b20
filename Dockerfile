# Outrigger container image: one static binary, the shipped configs, nothing
# else (no shell, no libc, no package manager).
#
# Compile inside the Rust image (needs a registry for the builder image):
#   docker build -t outrigger .
#   docker build --build-arg RUNTIME=gcr.io/distroless/static-debian12:nonroot -t outrigger .
#
# Package a binary compiled on the host (no registry needed: `scratch` is
# built in). This is what CI does, see .ci/docker.sh:
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --locked --bin outrigger --target x86_64-unknown-linux-gnu
#   strip --strip-debug target/x86_64-unknown-linux-gnu/release/outrigger  # optional: 100 -> 26 MB
#   docker build --target runtime-prebuilt -t outrigger .
#   (another binary: --build-arg PREBUILT=path/in/context; .dockerignore
#   must let it into the build context)
#
# The profile-guided build (about a quarter fewer instructions per request;
# two release builds and a training load, see benches/pgo.sh):
#   RUSTFLAGS="-C target-feature=+crt-static" bash benches/pgo.sh
#   docker build --target runtime-prebuilt \
#     --build-arg PREBUILT=target/pgo/x86_64-unknown-linux-gnu/release/outrigger -t outrigger .
#
# Run (any UID works; the configs are world-readable and nothing is written
# to the image filesystem, so --read-only is fine):
#   docker run --read-only --user 4242:4242 outrigger
#   docker run -v "$PWD/my.yaml:/etc/outrigger/sidecar.yaml:ro" outrigger
#
# Builders. --target runtime-prebuilt works with BuildKit and with the
# classic builder (DOCKER_BUILDKIT=0, the default of Debian's docker.io
# 20.10), which builds every stage up to the target whether the target needs
# it or not: that is why runtime-prebuilt comes before the builder stage and
# needs nothing but the build context. The default target needs BuildKit (the
# default since Docker 23; DOCKER_BUILDKIT=1 on 20.10): the classic builder
# would build runtime-prebuilt on the way and stop at its COPY when there is
# no prebuilt binary. (A daemon started with --bridge=none also needs
# `docker build --network host` for the builder's RUN.) COPY --chmod is not
# used (the classic builder lacks it): files keep their mode from the build
# context (git gives 0644 and cargo 0755, readable by every UID).
#
# DNS: the binary links glibc statically. Proxying needs no resolver (listeners
# and endpoints are IP:port), but a control-plane feed URL or the Kubernetes
# API named by host name goes through glibc's getaddrinfo. Static glibc
# (2.34+) has the `files` and `dns` NSS modules built in, so /etc/hosts and
# /etc/resolv.conf (both provided by the container runtime) work; any other
# nsswitch.conf source (mdns, ldap, systemd-resolved's `resolve`) would be
# dlopen()ed and cannot be in a scratch image. (Checked: a crt-static
# binary in a scratch container resolves names from /etc/hosts, --add-host
# and the DNS server in resolv.conf.)

ARG BUILDER=rust:1-slim-bookworm
ARG RUNTIME=scratch
ARG INIT_BASE=debian:bookworm-slim

# ---------------------------------------------------------------------------
# Common runtime settings (no files yet).
FROM ${RUNTIME} AS runtime-base
ARG VERSION=dev
# Cargo.toml declares neither a license nor a repository: pass them with
# --build-arg once the project has them. NOASSERTION is SPDX for "not stated".
ARG SOURCE=NOASSERTION
ARG LICENSES=NOASSERTION
LABEL org.opencontainers.image.title="outrigger" \
      org.opencontainers.image.description="Outrigger: a sidecar service-mesh proxy (sidecar, gateway and control plane in one static binary)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="${LICENSES}" \
      org.opencontainers.image.version="${VERSION}"
# 15001  outbound: this pod's app -> other services (sidecar config, 127.0.0.1)
# 15006  inbound: other pods -> this pod's app
# 15010  control plane feed (`outrigger control-plane`, HTTP/2 over mTLS)
# 15017  webhook (sidecar injection admission webhook)
# 15020  probes: /ready, /live and /metrics for the kubelet and Prometheus
# (the admin API, 15000, binds 127.0.0.1 only and is not exposed)
EXPOSE 15001 15006 15010 15017 15020
# Numeric, so no /etc/passwd is needed; any other UID:GID works as well.
USER 1337:1337
# Logs are JSON lines on stdout (access logs too); nothing goes to files.
ENTRYPOINT ["/outrigger"]
CMD ["run", "--config", "/etc/outrigger/sidecar.yaml"]

# ---------------------------------------------------------------------------
# The image from a binary compiled on the host (CI: no registry reachable).
FROM runtime-base AS runtime-prebuilt
ARG PREBUILT=target/x86_64-unknown-linux-gnu/release/outrigger
COPY config/sidecar.yaml config/gateway.yaml /etc/outrigger/
COPY ${PREBUILT} /outrigger

# ---------------------------------------------------------------------------
# Compile in the official Rust image (it has gcc and libc6-dev, whose libc.a
# the static link needs).
FROM ${BUILDER} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# cargo refuses to load the manifest when a declared [[bench]] file is
# missing, even for `--bin`; charts/.../crds is include_str!()ed by src/.
COPY benches ./benches
COPY charts/outrigger/crds ./charts/outrigger/crds
COPY config ./config
COPY src ./src
# crt-static links glibc into the binary. --target is required with it:
# RUSTFLAGS then apply to the target only, not to proc-macros and build
# scripts (which must stay dynamic). The host triple keeps arm64 builders
# working too. The release profile keeps line tables (~100 MB binary);
# strip --strip-debug drops them but keeps the symbols, so a panic's
# backtrace still names functions (~26 MB).
RUN set -eux; \
    target="$(rustc -vV | sed -n 's/^host: //p')"; \
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --bin outrigger --target "$target"; \
    install -D -m 0755 "target/$target/release/outrigger" /out/outrigger; \
    strip --strip-debug /out/outrigger; \
    install -D -m 0644 -t /out/etc/outrigger config/sidecar.yaml config/gateway.yaml; \
    /out/outrigger --version; \
    /out/outrigger validate /out/etc/outrigger/sidecar.yaml; \
    /out/outrigger validate /out/etc/outrigger/gateway.yaml

# ---------------------------------------------------------------------------
# The init container's image (`docker build --target init -t outrigger-init`):
# `outrigger init` installs the pod's redirect rules with iptables (nftables
# backend), which the scratch image lacks. It runs as root with NET_ADMIN
# and NET_RAW, once, before the proxy starts. (Not built in CI: it needs a
# Debian base image, and no registry is reachable there.)
FROM ${INIT_BASE} AS init
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/outrigger /outrigger
ENTRYPOINT ["/outrigger"]
CMD ["init"]

# ---------------------------------------------------------------------------
# Default target: the binary from the builder stage.
FROM runtime-base AS runtime
COPY --from=builder /out/ /
