-- The score orchestrator: run requests waiting for the one run at a time, and what each run
-- was asked by.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- One row: whether a run is requested and not yet started. Requests that arrive while a run
-- holds the lease set it; the holder clears it when it starts the follow-up run, so any
-- number of requests during a run coalesce into one follow-up.
CREATE TABLE IF NOT EXISTS score.scheduler (
    id smallint PRIMARY KEY CONSTRAINT scheduler_single_row CHECK (id = 1),
    run_pending boolean NOT NULL DEFAULT false,
    pending_trigger text,
    pending_requested_by uuid,
    pending_since timestamptz
);
INSERT INTO score.scheduler (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

ALTER TABLE score.runs ADD COLUMN IF NOT EXISTS algorithm text;
