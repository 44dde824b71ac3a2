# The gpunexus hub: `gpunexus hub serve` as a non-root user, state (the hub's
# signing key, SQLite by default) in a volume; PostgreSQL by --db URL.
#
#   docker/make-base.sh                          # once: gpunexus-base:bookworm, no registry pull
#   docker build -f docker/hub.Dockerfile -t gpunexus-hub .
#   docker run -d -p 8080:8080 -v gpunexus-hub:/var/lib/gpunexus gpunexus-hub
#
# docker/compose.yaml runs it with PostgreSQL.
ARG BASE=gpunexus-base:bookworm

# --- build: a venv with gpunexus, its dependencies and psycopg -------------
# Its first layers are host.Dockerfile's (see below).
FROM ${BASE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgmp-dev python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/gpunexus/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gpunexus/venv
# Dependencies first (their own layer) with the build backend: a change to the
# source then reinstalls only gpunexus, offline. Every line up to this layer is
# host.Dockerfile's, letter for letter, so docker's layer cache builds it once
# for both images (a minute of pip on a 2-core machine); keep them the same.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" >/tmp/requirements.txt \
    && pip install -q -r /tmp/requirements.txt 'setuptools>=77' wheel
# The postgres extra on top, in a layer of its own.
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['optional-dependencies']['postgres']))" >/tmp/postgres.txt \
    && pip install -q -r /tmp/postgres.txt
COPY README.md /src/
COPY gpunexus /src/gpunexus
COPY protocol /src/protocol
COPY pricing /src/pricing
COPY verify /src/verify
COPY node /src/node
COPY hub /src/hub
RUN pip install -q --no-deps --no-build-isolation /src && gpunexus hub --help >/dev/null

# --- runtime --------------------------------------------------------------
FROM ${BASE}
RUN if ! command -v tini >/dev/null || ! python3 -c 'import venv' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini libgmp10 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/gpunexus/venv /opt/gpunexus/venv
ENV PATH=/opt/gpunexus/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gpunexus \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gpunexus --shell /usr/sbin/nologin gpunexus \
    && install -d -o gpunexus -g gpunexus -m 0700 /var/lib/gpunexus
ENV GPUNEXUS_HOME=/var/lib/gpunexus
VOLUME /var/lib/gpunexus
USER gpunexus
WORKDIR /var/lib/gpunexus
EXPOSE 8080/tcp

# Healthy = the hub answers its public info endpoint (GET /v1/hub).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/hub', timeout=5)"]

# The hub finishes the requests in flight on SIGTERM, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "gpunexus"]
CMD ["hub", "serve", "--host", "0.0.0.0", "--port", "8080"]
