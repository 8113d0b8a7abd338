# syntax=docker/dockerfile:1
#
# token-proxy and mock-idp in one small image. The default command is token-proxy; the compose
# file runs mock-idp from the same image with `entrypoint: ["mock-idp"]`.
#
#   docker build -t token-proxy .
#   docker run --rm -p 8080:8080 -e TOKEN_PROXY_UPSTREAM_URL=https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token token-proxy

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build directory between builds (BuildKit, the
# default builder of current Docker); the binaries are copied out of the cached target/.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p token-proxy -p mock-idp \
    && mkdir -p /out \
    && cp target/release/token-proxy target/release/mock-idp /out/

# ---- run -----------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to Cognito. curl: the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 token-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin token-proxy
COPY --from=builder /out/token-proxy /out/mock-idp /usr/local/bin/
USER 10001:10001

# Client-facing: POST /oauth2/token (TOKEN_PROXY_LISTEN, default 0.0.0.0:8080).
EXPOSE 8080
# Admin: /healthz, /readyz, /metrics (TOKEN_PROXY_ADMIN_LISTEN, default 127.0.0.1:9090: only
# reachable inside the container; set 0.0.0.0:9090 to let Prometheus and a load balancer in).
EXPOSE 9090

# Alive = the admin listener answers /healthz, on whatever port TOKEN_PROXY_ADMIN_LISTEN names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD addr="${TOKEN_PROXY_ADMIN_LISTEN:-127.0.0.1:9090}"; curl -fsS -o /dev/null "http://127.0.0.1:${addr##*:}/healthz" || exit 1

# SIGTERM (docker stop) makes /readyz answer 503, stops accepting and lets in-flight requests
# finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["token-proxy"]
