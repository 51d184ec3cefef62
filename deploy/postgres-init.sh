#!/bin/sh
# Roles of the compose `fleet` profile, created once by the postgres image on a new volume:
# the owner (POSTGRES_USER) runs `llmtap audit migrate --grant llmtap_sidecar --grant grafana_reader`;
# sidecars log in as llmtap_sidecar (INSERT and SELECT only), Grafana as grafana_reader.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v sidecar_pw="$LLMTAP_PG_SIDECAR_PASSWORD" -v reader_pw="$GRAFANA_PG_PASSWORD" <<'SQL'
CREATE ROLE llmtap_sidecar LOGIN PASSWORD :'sidecar_pw';
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_pw';
SQL
