-- Least privilege in the database: what each runtime role may do (docs/SECURITY.md, "Database
-- roles"). The roles themselves are cluster-wide and created beforehand by
-- crates/store/sql/roles.sql (`trellisctl db roles`); this migration only grants, so the role
-- that runs the migrations (the owner of every table) needs no CREATEROLE.
--
-- Runtime roles get DML only (SELECT, INSERT, UPDATE, DELETE), never CREATE on a schema, and only
-- on the schemas their binary reads or writes. Tables created later by the same role that runs
-- this migration (the migration owner) get the same grants through the default privileges set
-- below, so a new table in an existing schema needs no grant of its own; a new schema does.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

DO $check$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY[
        'trellis_owner', 'trellis_api', 'trellis_score_orchestrator', 'trellis_search_projector',
        'trellis_dispute_processor', 'trellisctl'
    ] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = wanted) THEN
            RAISE EXCEPTION 'database role % is missing', wanted
                USING HINT = 'run `trellisctl db roles` (crates/store/sql/roles.sql) as a role with CREATEROLE, then migrate again';
        END IF;
    END LOOP;
END
$check$;

-- trellis-api runs every processor in-process while its cutover flag says `monolith`, and
-- their shadow candidates: DML on every schema.
GRANT USAGE ON SCHEMA identity, contacts, circles, security, score, search, ops, shadow TO trellis_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow TO trellis_api;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow TO trellis_api;

-- score-orchestrator: reads the graph (users, contacts, disputes), writes scores, its shadow
-- runs and their comparisons, and its events to the outbox.
GRANT USAGE ON SCHEMA identity, contacts, security, score, ops, shadow TO trellis_score_orchestrator;
GRANT SELECT ON ALL TABLES IN SCHEMA contacts, security TO trellis_score_orchestrator;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA score, shadow TO trellis_score_orchestrator;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA score, shadow TO trellis_score_orchestrator;

-- search-projector: reads what a search document is made of, writes the read model and its
-- shadow copy, reads the outbox (its lag and the comparer's fence).
GRANT USAGE ON SCHEMA identity, contacts, circles, security, score, search, ops, shadow TO trellis_search_projector;
GRANT SELECT ON ALL TABLES IN SCHEMA contacts, circles, security, score TO trellis_search_projector;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA search, shadow TO trellis_search_projector;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA search, shadow TO trellis_search_projector;

-- dispute-processor: decides disputes, suspends users (and revokes their tokens), hides them;
-- reads scores; writes its shadow decisions and its events.
GRANT USAGE ON SCHEMA identity, security, score, ops, shadow TO trellis_dispute_processor;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA identity, security, shadow TO trellis_dispute_processor;
GRANT SELECT ON ALL TABLES IN SCHEMA score TO trellis_dispute_processor;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA identity, security, shadow TO trellis_dispute_processor;

-- Of `identity`, the score orchestrator and the search projector read the users' public
-- columns: no e-mail address, no password hash, no token, and no identity table added later
-- unless a migration grants it.
GRANT SELECT (id, handle, display_name, role, status, verified, version, created_at, updated_at)
    ON identity.users TO trellis_score_orchestrator, trellis_search_projector;

-- The workers' part of `ops`, table by table: the outbox (events in; the projector only reads
-- it) and the cutover flags with their audit (read). Nothing else in `ops` (idempotency keys,
-- dead-letter audit) is theirs.
GRANT SELECT, INSERT ON ops.outbox TO trellis_score_orchestrator, trellis_dispute_processor;
GRANT SELECT ON ops.outbox TO trellis_search_projector;
GRANT SELECT ON ops.feature_flags, ops.feature_flag_audit
    TO trellis_score_orchestrator, trellis_search_projector, trellis_dispute_processor;

-- trellisctl, the on-call tool (its `migrate` runs as the migration owner, not as this role):
-- users and roles, disputes, score runs, search rebuilds, the outbox, dead letters and flags;
-- reads contacts, circles and shadow parity.
GRANT USAGE ON SCHEMA identity, contacts, circles, security, score, search, ops, shadow TO trellisctl;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA identity, security, score, search, ops TO trellisctl;
GRANT SELECT ON ALL TABLES IN SCHEMA contacts, circles, shadow TO trellisctl;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA identity, security, score, search, ops TO trellisctl;

-- The same for tables and sequences the migration owner creates later.
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO trellis_api;
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    GRANT USAGE, SELECT ON SEQUENCES TO trellis_api;
ALTER DEFAULT PRIVILEGES IN SCHEMA contacts, security
    GRANT SELECT ON TABLES TO trellis_score_orchestrator;
ALTER DEFAULT PRIVILEGES IN SCHEMA score, shadow
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO trellis_score_orchestrator;
ALTER DEFAULT PRIVILEGES IN SCHEMA score, shadow
    GRANT USAGE, SELECT ON SEQUENCES TO trellis_score_orchestrator;
ALTER DEFAULT PRIVILEGES IN SCHEMA contacts, circles, security, score
    GRANT SELECT ON TABLES TO trellis_search_projector;
ALTER DEFAULT PRIVILEGES IN SCHEMA search, shadow
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO trellis_search_projector;
ALTER DEFAULT PRIVILEGES IN SCHEMA search, shadow
    GRANT USAGE, SELECT ON SEQUENCES TO trellis_search_projector;
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, security, shadow
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO trellis_dispute_processor;
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, security, shadow
    GRANT USAGE, SELECT ON SEQUENCES TO trellis_dispute_processor;
ALTER DEFAULT PRIVILEGES IN SCHEMA score
    GRANT SELECT ON TABLES TO trellis_dispute_processor;
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, security, score, search, ops
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO trellisctl;
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, security, score, search, ops
    GRANT USAGE, SELECT ON SEQUENCES TO trellisctl;
ALTER DEFAULT PRIVILEGES IN SCHEMA contacts, circles, shadow
    GRANT SELECT ON TABLES TO trellisctl;
