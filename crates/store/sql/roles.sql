-- The database roles of Trellis: one owner of the schema (the migrations run as it) and one
-- runtime role per binary. Roles belong to the PostgreSQL cluster, not to a database, so this
-- script is not a migration: a role with CREATEROLE runs it once per cluster
-- (`trellisctl db roles`, the compose stack's PostgreSQL initialisation, or psql -f), before the
-- first migration. It is idempotent and safe to run from several sessions at once.
--
-- Every role is created NOLOGIN: the privileges go to these roles (migration
-- 20261204000401_database_roles and the default privileges it sets), and a deployment either
-- lets a role log in (`ALTER ROLE trellis_api LOGIN PASSWORD '…'`) or logs in as a role of its
-- own that is a member and acts as it (`CREATE ROLE api_prod LOGIN PASSWORD '…' IN ROLE
-- trellis_api; ALTER ROLE api_prod SET role = 'trellis_api'`).
-- docs/SECURITY.md has the matrix of what each role may do.
DO $roles$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY[
        'trellis_owner', 'trellis_api', 'trellis_score_orchestrator', 'trellis_search_projector',
        'trellis_dispute_processor', 'trellisctl'
    ] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = wanted) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', wanted);
            EXCEPTION
                -- another session created it between the check and the CREATE
                WHEN duplicate_object OR unique_violation THEN NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;
