# syntax=docker/dockerfile:1.7
# Every Trellis binary, built once, in one slim runtime image; the process is chosen by the
# command (`trellis-api`, `score-orchestrator`, `search-projector`, `dispute-processor`,
# `trellisctl`). Base images are pinned by version; pin them by digest in the registry you
# deploy from.

FROM rust:1.88.0-bookworm AS build
WORKDIR /src
COPY . .
# The cargo registry and the target directory live in build caches, so dependencies are
# downloaded and compiled once, not on every source change.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins --exclude xtask \
    && mkdir /out \
    && find target/release -maxdepth 1 -type f -perm -u+x ! -name 'trellis-probe-worker' -exec cp {} /out/ \;

FROM debian:bookworm-20241111-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 trellis \
    && useradd --uid 10001 --gid trellis --no-create-home --shell /usr/sbin/nologin trellis
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# Every process serves /healthz on its admin listener; in the image it listens on 9080.
ENV ADMIN_ADDR=0.0.0.0:9080 \
    API_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080 9080
# No curl in a slim image: bash's /dev/tcp speaks the one HTTP request needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
CMD ["trellis-api"]
