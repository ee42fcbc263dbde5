FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
# Editable install keeps config/ (the bundled price table) beside the package.
RUN pip install --no-cache-dir -e . \
    && useradd --create-home --uid 10001 meter \
    && mkdir -p /runs && chown meter:meter /runs

USER meter
VOLUME ["/runs"]
EXPOSE 8787
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2).status == 200 else 1)"
# Inside a container the proxy must bind all interfaces to be reachable through -p.
ENTRYPOINT ["metering-proxy", "serve", "--host", "0.0.0.0", "--runs-dir", "/runs"]
