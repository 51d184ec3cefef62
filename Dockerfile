# The llmtap sidecar image. `docker compose up` builds it (docker-compose.yml); by itself:
#   docker build -t llmtap . && docker run -p 8080:8080 -p 9464:9464 -v llmtap-data:/data llmtap
# tests/test_deploy.py replays these steps in a clean venv (no Docker engine is needed for that).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY addons ./addons
# A current pip: older resolvers give up on mitmproxy's and the openai SDK's pins.
# .[postgres]: psycopg for a fleet's PostgreSQL audit store (--db postgresql://...).
RUN pip install --upgrade pip && pip install .[postgres] && cd / && rm -rf /src

# Not root; /data (audit DB) and the mitmproxy CA under /home/llmtap belong to this user.
RUN useradd --create-home --uid 10001 llmtap && mkdir /data /journal && chown llmtap /data /journal
USER llmtap
WORKDIR /data
VOLUME ["/data"]

# 8080: the proxy (apps use http://HOST:8080/v1 as base URL); 9464: Prometheus /metrics.
EXPOSE 8080 9464
ENTRYPOINT ["llmtap"]
CMD ["run", "--listen-host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--db", "/data/llmtap.db"]
