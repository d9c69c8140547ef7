-- migrate:up
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    title       text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    location    text,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_ends_after_start CHECK (ends_at IS NULL OR ends_at >= starts_at)
);

CREATE INDEX events_starts_at_idx ON events (starts_at);

-- migrate:down
DROP TABLE IF EXISTS events;
