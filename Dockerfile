FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# The dependencies get their own layer, keyed on pyproject.toml alone: a change to the source or the
# README then rebuilds only the small layer below, not aiohttp, uvloop and the rest.
# EXTRAS: optional dependency groups to add, comma-separated (compose.yaml builds with EXTRAS=fleet).
ARG EXTRAS=""
COPY pyproject.toml ./
RUN python -c "import os, sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ.get('EXTRAS', '').split(',') if e]; \
sys.stdout.writelines(d + '\n' for d in p['dependencies'] + [x for e in extras for x in p['optional-dependencies'][e]])" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# A regular install, as a user gets it from the wheel: the price table travels as package data, and the
# source copy is removed so nothing can import it instead of the installed package.
COPY README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src \
    && useradd --create-home --uid 10001 meter \
    && mkdir -p /runs && chown meter:meter /runs

USER meter
WORKDIR /home/meter
VOLUME ["/runs"]
EXPOSE 8787
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2).status == 200 else 1)"
# Inside a container the proxy must bind all interfaces to be reachable through -p.
ENTRYPOINT ["metering-proxy", "serve", "--host", "0.0.0.0", "--runs-dir", "/runs"]
