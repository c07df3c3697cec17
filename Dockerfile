# syntax=docker/dockerfile:1.7@sha256:a57df69d0ea827fb7266491f2813635de6f17269be881f696fbfdf2d83dda33e
# Every Trellis binary, built once, in one slim runtime image; the process is chosen by the
# command (`trellis-api`, `score-orchestrator`, `search-projector`, `dispute-processor`,
# `trellisctl`). Base images (and the Dockerfile frontend) are pinned by tag and digest: the
# digest is what is pulled, the tag says what it is. Refresh: deploy/README.md, "Image digests".

FROM rust:1.88.0-bookworm@sha256:af306cfa71d987911a781c37b59d7d67d934f49684058f96cf72079c3626bfe0 AS build
WORKDIR /src
COPY . .
# The cargo registry and the target directory live in build caches, so dependencies are
# downloaded and compiled once, not on every source change.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins --exclude xtask --exclude trellis-testkit \
    && mkdir /out \
    && find target/release -maxdepth 1 -type f -perm -u+x ! -name 'trellis-probe-worker' -exec cp {} /out/ \;

FROM debian:bookworm-20250721-slim@sha256:2424c1850714a4d94666ec928e24d86de958646737b1d113f5b2207be44d37d8 AS runtime
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
