# syntax=docker/dockerfile:1
# One image for every KVC component: `kvc run controller`, `kvc run agent`, `kvc run webhook`
# (and `kvc certs ...`). Build with `make docker-build IMG=...`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: a wheel of KVC plus wheels of all its dependencies, so the runtime stage installs
# offline and carries no build tools or source tree.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package is built from (.dockerignore keeps the context to the same list).
COPY pyproject.toml README.md ./
COPY kvc ./kvc
COPY webhook ./webhook
COPY certs ./certs
RUN pip wheel --wheel-dir /wheels .

# Runtime: the slim Python image with KVC installed, running as an unprivileged user.
FROM ${PYTHON_IMAGE}
# The pods run with a read-only root filesystem: bytecode is compiled by pip at install
# time, and Python does not try to write more.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels kvc
# A numeric UID/GID (distroless' "nonroot"), so `runAsNonRoot: true` can verify it. It also
# gets an /etc/passwd entry: Python's getpass.getuser() (kopf calls it when POD_ID is unset)
# raises for a UID without one. The agent's DaemonSet overrides the user (deploy/agent says why).
RUN groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin nonroot
USER 65532:65532
ENTRYPOINT ["kvc"]
CMD ["--help"]
