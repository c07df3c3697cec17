#!/bin/sh
# Run by the postgres image's entrypoint once, on a new data directory, after
# 01-trellis-roles.sql (crates/store/sql/roles.sql) created the Trellis roles: lets each role
# log in with its own password, and gives the database to the migration owner. The superuser
# (POSTGRES_USER) is used for this initialisation only; no Trellis process logs in as it.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="$POSTGRES_DB" \
    -v owner_password="$TRELLIS_OWNER_DB_PASSWORD" \
    -v api_password="$TRELLIS_API_DB_PASSWORD" \
    -v score_password="$TRELLIS_SCORE_ORCHESTRATOR_DB_PASSWORD" \
    -v search_password="$TRELLIS_SEARCH_PROJECTOR_DB_PASSWORD" \
    -v dispute_password="$TRELLIS_DISPUTE_PROCESSOR_DB_PASSWORD" \
    -v ctl_password="$TRELLISCTL_DB_PASSWORD" <<'SQL'
ALTER ROLE trellis_owner LOGIN PASSWORD :'owner_password';
ALTER ROLE trellis_api LOGIN PASSWORD :'api_password';
ALTER ROLE trellis_score_orchestrator LOGIN PASSWORD :'score_password';
ALTER ROLE trellis_search_projector LOGIN PASSWORD :'search_password';
ALTER ROLE trellis_dispute_processor LOGIN PASSWORD :'dispute_password';
ALTER ROLE trellisctl LOGIN PASSWORD :'ctl_password';
ALTER DATABASE :"db" OWNER TO trellis_owner;
SQL
