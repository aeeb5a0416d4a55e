-- The delivery log: one row per attempt, successes included (per observer, `record = "all"`,
-- "failures" or "none"). Written in batches off the delivery path; read by `deliveries list`
-- and `explain`; pruned by `prune` after its own retention period. Rows are facts about
-- attempts made, so they are not fenced: a deposed leader's attempts happened too.
CREATE TABLE IF NOT EXISTS core.observer_delivery_log (
    consumer_id TEXT NOT NULL,
    event_id UUID NOT NULL,
    event_sequence BIGINT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_key TEXT NOT NULL,
    observer TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    action_type TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    -- ok, or the failure's class: transient, permanent or gone.
    outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'transient', 'permanent', 'gone')),
    status_code INTEGER,
    error TEXT,
    response_excerpt TEXT
);
-- Time order for `--since` and for pruning; cheap to maintain on an append-only table.
CREATE INDEX IF NOT EXISTS idx_observer_delivery_log_time
    ON core.observer_delivery_log USING brin (started_at);
-- One change's attempts (`explain --sequence`, `deliveries list --sequence`).
CREATE INDEX IF NOT EXISTS idx_observer_delivery_log_sequence
    ON core.observer_delivery_log (event_sequence);
