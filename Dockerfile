# syntax=docker/dockerfile:1
#
# token-proxy's image, and apart from it (a target of its own) mock-idp's, a test double that
# never ships in the proxy's image.
#
#   docker build -t token-proxy .                                 # the proxy (the last stage)
#   docker build --target mock-idp -t token-proxy-mock-idp .      # the mock, NOT FOR PRODUCTION
#   docker run --rm -p 8080:8080 -e TOKEN_PROXY_UPSTREAM_URL=https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token token-proxy
#
# Both architectures at once (BuildKit, with QEMU or native builders for the other one):
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse --short=12 HEAD)" \
#     --build-arg SOURCE=https://github.com/ORG/token-proxy \
#     -t REGISTRY/token-proxy:0.1.0 --push .
#
# REVISION becomes the commit `token-proxy --version` and `token_proxy_build_info` report (the
# build context has no .git) and, with VERSION, the image's OCI labels.

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
ARG REVISION=unknown
# Set by BuildKit; names the target/ cache of this platform.
ARG TARGETPLATFORM
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build directory between builds (BuildKit, the
# default builder of current Docker); the binary is copied out of the cached target/. A
# multi-platform build runs one of these per platform at once: each platform has a target/ of
# its own (or one's build scripts and binaries would be another's), and `locked` makes
# concurrent builds of one platform, and the shared registry's writers, wait their turn.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=target-$TARGETPLATFORM,sharing=locked \
    TOKEN_PROXY_BUILD_COMMIT="$REVISION" cargo build --release --locked -p token-proxy \
    && mkdir -p /out \
    && cp target/release/token-proxy /out/

FROM builder AS mock-idp-builder
# An ARG ends with its stage: declared again for the cache id.
ARG TARGETPLATFORM
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=target-$TARGETPLATFORM,sharing=locked \
    cargo build --release --locked -p mock-idp \
    && cp target/release/mock-idp /out/

# ---- mock-idp (docker-compose.yml and the development overlay only) ------------------------
FROM debian:bookworm-slim AS mock-idp
# curl: docker-compose.yml's health check of the mock.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=mock-idp-builder /out/mock-idp /usr/local/bin/
LABEL org.opencontainers.image.title="mock-idp" \
      org.opencontainers.image.description="A Cognito-compatible token server for tests. NOT FOR PRODUCTION."
USER 10001:10001
EXPOSE 9000
ENTRYPOINT ["mock-idp"]

# ---- run: token-proxy (the default target) -------------------------------------------------
# Distroless: glibc, CA certificates (TLS to Cognito) and nothing else: no shell, no package
# manager, no curl. The binary checks its own health (`token-proxy --health`).
FROM gcr.io/distroless/cc-debian12 AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
# Where the source lives, e.g. --build-arg SOURCE=https://github.com/ORG/token-proxy.
ARG SOURCE=""
LABEL org.opencontainers.image.title="token-proxy" \
      org.opencontainers.image.description="A caching proxy for OAuth2 client-credentials token endpoints (Amazon Cognito first)" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION"
COPY --from=builder /out/token-proxy /usr/local/bin/token-proxy
# The uid the Kubernetes manifests and the ECS task run as; no passwd entry is needed.
USER 10001:10001

# Client-facing: POST /oauth2/token (TOKEN_PROXY_LISTEN, default 0.0.0.0:8080).
EXPOSE 8080
# Admin: /healthz, /readyz, /metrics (TOKEN_PROXY_ADMIN_LISTEN, default 127.0.0.1:9090: only
# reachable inside the container; set 0.0.0.0:9090 to let Prometheus and a load balancer in).
EXPOSE 9090

# Alive = the admin listener answers /healthz, at whatever address TOKEN_PROXY_ADMIN_LISTEN
# names (a wildcard bind is asked on loopback).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/token-proxy", "--health"]

# SIGTERM (docker stop) makes /readyz answer 503, stops accepting and lets in-flight requests
# finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/token-proxy"]
