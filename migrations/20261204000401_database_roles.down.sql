-- Takes back every grant of the up migration. The roles stay: they belong to the cluster, and
-- other databases of it may use them.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER DEFAULT PRIVILEGES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    REVOKE ALL ON TABLES FROM trellis_api, trellis_score_orchestrator, trellis_search_projector, trellis_dispute_processor, trellisctl;
ALTER DEFAULT PRIVILEGES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    REVOKE ALL ON SEQUENCES FROM trellis_api, trellis_score_orchestrator, trellis_search_projector, trellis_dispute_processor, trellisctl;
REVOKE ALL ON ALL TABLES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    FROM trellis_api, trellis_score_orchestrator, trellis_search_projector, trellis_dispute_processor, trellisctl;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    FROM trellis_api, trellis_score_orchestrator, trellis_search_projector, trellis_dispute_processor, trellisctl;
REVOKE ALL ON SCHEMA identity, contacts, circles, security, score, search, ops, shadow
    FROM trellis_api, trellis_score_orchestrator, trellis_search_projector, trellis_dispute_processor, trellisctl;
