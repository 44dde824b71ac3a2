# A gpunexus host: `gpunexus node serve` as a non-root user, state in a volume.
#
#   docker/make-base.sh                          # once: gpunexus-base:bookworm, no registry pull
#   docker build -f docker/host.Dockerfile -t gpunexus-host .
#   docker run -d --name gpunexus-host --network host --stop-timeout 600 \
#       -v gpunexus-host:/var/lib/gpunexus gpunexus-host \
#       node serve --model tiny --backend reference --price 0.20
#
# Backends built in: reference (CPU, numpy) and openai (forwards to an
# Ollama/vLLM/llama.cpp/TGI server; with --network host it reaches one on
# the host's loopback). exllamav2 needs CUDA: see README "Run a host".
ARG BASE=gpunexus-base:bookworm

# --- build: a venv with gpunexus and its dependencies --------------------
# Some dependencies compile (fastecdsa, under libp2p, has no wheel for every
# Python): the compiler stays in this stage, only the venv moves on.
FROM ${BASE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgmp-dev python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/gpunexus/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gpunexus/venv
# The dependencies first, in their own layer: a change to the source then
# reinstalls only gpunexus itself, not numpy, cryptography and libp2p. With the
# build backend here too, that install needs no download (--no-build-isolation).
# hub.Dockerfile begins with the same lines up to this layer, so one build
# of it serves both images.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" >/tmp/requirements.txt \
    && pip install -q -r /tmp/requirements.txt 'setuptools>=77' wheel
COPY README.md /src/
COPY gpunexus /src/gpunexus
COPY protocol /src/protocol
COPY pricing /src/pricing
COPY verify /src/verify
COPY node /src/node
COPY hub /src/hub
# EXTRAS=exllamav2 on a CUDA base (see README "Run a host"); empty here.
ARG EXTRAS=""
RUN pip install -q --no-deps --no-build-isolation /src \
    && if [ -n "$EXTRAS" ]; then pip install -q "/src[$EXTRAS]"; fi \
    && gpunexus --help >/dev/null

# --- runtime --------------------------------------------------------------
FROM ${BASE}
# docker/make-base.sh's base has these; another Debian/Ubuntu base gets them from apt.
RUN if ! command -v tini >/dev/null || ! python3 -c 'import venv' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini libgmp10 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/gpunexus/venv /opt/gpunexus/venv
ENV PATH=/opt/gpunexus/venv/bin:$PATH PYTHONUNBUFFERED=1

# A system user owns the state: identity key, control file, receipts.
RUN groupadd --system --gid 10001 gpunexus \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gpunexus --shell /usr/sbin/nologin gpunexus \
    && install -d -o gpunexus -g gpunexus -m 0700 /var/lib/gpunexus
ENV GPUNEXUS_HOME=/var/lib/gpunexus
VOLUME /var/lib/gpunexus
USER gpunexus
WORKDIR /var/lib/gpunexus

# libp2p (the default --listen). There is no HTTP port: clients reach a host
# through their own gateway, peer to peer.
EXPOSE 4001/tcp

# Healthy = the host answers on its loopback control endpoint (what
# `gpunexus node status` reads); a crashed or hung host fails it.
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["gpunexus", "node", "status"]

# docker stop sends SIGTERM to tini, which passes it on: the host stops taking
# orders, lets those in flight finish, withdraws its offer and exits. Give it
# the time a long answer needs: `docker run --stop-timeout 600` or
# `docker stop -t 600` (docker's default is 10 s, then SIGKILL).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "gpunexus"]
CMD ["node", "serve", "--model", "tiny", "--backend", "reference"]
