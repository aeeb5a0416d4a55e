-- The observer's own bookkeeping: where each consumer stands, and rows it could not decode.

-- One row per consumer (listener id). Everything visible in `snapshot` is handled. When a batch is
-- in progress, `batch_snapshot` is its upper bound and rows of the batch (visible in
-- `batch_snapshot`, not in `snapshot`) with a sequence <= `batch_done_sequence` are handled too.
-- `epoch` fences a deposed leader: every write says `AND epoch = mine`.
CREATE TABLE IF NOT EXISTS core.observer_checkpoints (
    consumer_id TEXT PRIMARY KEY,
    snapshot pg_snapshot NOT NULL,
    batch_snapshot pg_snapshot,
    batch_done_sequence BIGINT,
    epoch BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((batch_snapshot IS NULL) = (batch_done_sequence IS NULL))
);

-- Change-log rows a consumer could not decode, with the reason and a copy of the row as read.
CREATE TABLE IF NOT EXISTS core.observer_quarantine (
    consumer_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    reason TEXT NOT NULL,
    row_data JSONB,
    quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_id, sequence)
);
