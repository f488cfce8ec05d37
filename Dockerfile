# syntax=docker/dockerfile:1
# scanwatch as a container: `docker build -t scanwatch .`, then see docs/operations.md.
# The builder makes a wheel of this checkout and installs it, with binary wheels of its
# dependencies only, into a venv; the final image gets that venv and nothing else.

FROM python:3.12-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/scanwatch \
 && python -m pip --python /opt/scanwatch/bin/python install --only-binary=:all: /wheels/scanwatch-*.whl


FROM python:3.12-slim
LABEL org.opencontainers.image.title="scanwatch" \
      org.opencontainers.image.description="Watch drop folders, scan every new file, move it to clean, quarantine or failed" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid, so that bind-mounted drop folders can be granted to it on the host.
RUN groupadd --system --gid 10001 scanwatch \
 && useradd --system --uid 10001 --gid scanwatch --home-dir /var/lib/scanwatch --no-create-home \
            --shell /usr/sbin/nologin scanwatch \
 && install -d -o scanwatch -g scanwatch -m 0750 /var/lib/scanwatch \
 && install -d -m 0755 /etc/scanwatch

COPY --from=builder /opt/scanwatch /opt/scanwatch

ENV PATH=/opt/scanwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SCANWATCH_CONFIG=/etc/scanwatch/scanwatch.yaml

# state_dir: the journal must outlive the container, or files in flight are forgotten.
VOLUME ["/var/lib/scanwatch"]
USER 10001:10001
# metrics.listen, when the config sets it (0.0.0.0:9477 in config/docker.yaml).
EXPOSE 9477

# Asks /healthz of the config in $SCANWATCH_CONFIG; passes when that config serves no metrics.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "daemon.healthcheck"]

ENTRYPOINT ["scanwatch"]
CMD ["run", "--config", "/etc/scanwatch/scanwatch.yaml"]
