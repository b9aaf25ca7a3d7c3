# privacy-gateway, standalone mode: the gateway in front of your site, served by uvicorn on port 8000.
#
#   docker build -t privacy-gateway .
#   docker run -p 8000:8000 -v "$PWD/config:/config:ro" -v "$PWD/data:/data" privacy-gateway
#
# Nothing site-specific is baked in: /config holds gateway.toml (secrets as ${VAR} references, passed with -e),
# /data holds the GeoIP .mmdb (point geo.database at it) and the gateway's state (spool, consent receipts).

# Build stage: the wheel with the request path compiled by mypyc (pyproject.toml, hatch-mypyc hook). The full image
# has the C compiler the slim one lacks; both are CPython 3.11 on Debian bookworm, so the wheel fits the runtime.
FROM python:3.11-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN HATCH_BUILD_HOOKS_ENABLE=1 pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The compiled wheel from the build stage, with its pinned-by-range dependencies from PyPI.
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels

# An unprivileged system user; it owns /data only, so the code and the config stay read-only to the process.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /config /data \
    && chown 10001:10001 /data

# Numeric, so the runtime (and Kubernetes' runAsNonRoot) can verify it without the image's /etc/passwd.
USER 10001:10001
# Relative state paths in the config (spool, receipts under var/) resolve inside the /data volume.
WORKDIR /data
VOLUME ["/config", "/data"]
EXPOSE 8000

# No curl in slim images. The proxy handler is emptied so HTTP(S)_PROXY variables cannot reroute the probe.
# The path assumes the default prefix ("/_privacy"); change it here too if the config changes it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/_privacy/healthz', timeout=4)"]

CMD ["gateway", "serve", "--config", "/config/gateway.toml", "--host", "0.0.0.0"]
