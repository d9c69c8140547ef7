-- migrate:up
-- Job queue drained by the app's background worker (SELECT ... FOR UPDATE SKIP LOCKED).
CREATE TABLE jobs (
    id          bigserial PRIMARY KEY,
    kind        text        NOT NULL,
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state       text        NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'running', 'done', 'failed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

-- Small partial index: the worker and the health check only look at pending jobs.
CREATE INDEX jobs_pending_idx ON jobs (id) WHERE state = 'pending';

-- migrate:down
DROP TABLE IF EXISTS jobs;
