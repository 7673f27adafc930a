# refiner-gateway container image.
#
# Build:  docker build -t refiner-gateway .
# Run:    docker run -p 8080:8080 -v gateway-data:/var/lib/refiner-gateway \
#           -e GATEWAY_WRITE_KEYS=... -e REFINER_API_KEY=... \
#           --stop-timeout 70 refiner-gateway
#
# --stop-timeout: a graceful stop may take twice shutdown_timeout_secs (requests, then
# delivery); see docs/operations.md. A host folder mounted instead of the named volume
# must be writable by uid 65532 (chown -R 65532:65532 DIR), or the gateway exits 1 at
# start-up naming the data directory.
#
# The dependencies are compiled in a layer of their own, from the manifest and the lock
# file with stub sources, so a change to src/ or benches/ rebuilds only the gateway.
# Two stages: the release binary is built with the locked dependencies on Debian bookworm,
# then copied alone into distroless/cc (glibc and libgcc of the same Debian release, no
# shell, no package manager), running as the unprivileged user 65532. The spool lives in
# the volume /var/lib/refiner-gateway; see docs/operations.md.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# No debug info and no symbols in the image's binary (the release profile keeps line
# tables for local profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
COPY Cargo.toml Cargo.lock ./
# Stubs for every target the manifest declares (Cargo reads them all), then the
# dependencies alone; the stubs are removed before the real sources come in (the test
# targets' stubs stay: the image builds no test).
RUN mkdir -p src/bin benches tests \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/refiner-sim.rs \
    && touch src/lib.rs \
    && awk '/^\[\[bench\]\]/ { bench = 1; next } bench && /^name *=/ { gsub(/^name *= *"|"$/, ""); print; bench = 0 }' Cargo.toml \
       | while read -r name; do echo 'fn main() {}' > "benches/$name.rs"; done \
    && awk '/^\[\[test\]\]/ { test = 1; next } test && /^name *=/ { gsub(/^name *= *"|"$/, ""); print; test = 0 }' Cargo.toml \
       | while read -r name; do echo 'fn main() {}' > "tests/$name.rs"; done \
    && cargo build --release --locked --bin refiner-gateway \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
# COPY keeps the files' times, which may be older than the stubs' build: touch the
# crate's roots so Cargo rebuilds the gateway itself.
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked --bin refiner-gateway \
    && install -D -m 0755 target/release/refiner-gateway /out/refiner-gateway \
    && mkdir -p /out/data \
    && /out/refiner-gateway --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/refiner-gateway /usr/local/bin/refiner-gateway
# The data directory exists and belongs to the runtime user, also when a fresh named
# volume is mounted over it (Docker copies the ownership into a new volume).
COPY --from=build --chown=65532:65532 /out/data /var/lib/refiner-gateway
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_DATA_DIR=/var/lib/refiner-gateway \
    GATEWAY_LOG_FORMAT=json
USER 65532:65532
VOLUME ["/var/lib/refiner-gateway"]
EXPOSE 8080
# SIGTERM drains: in-flight requests finish, delivery settles, the spool checkpoints.
STOPSIGNAL SIGTERM
# The image has no curl: the binary probes itself (/healthz on GATEWAY_LISTEN's port).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/refiner-gateway", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/refiner-gateway"]
CMD ["serve"]
