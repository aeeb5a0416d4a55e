-- Backfills (`fraiseql-observers backfill`): one row per backfill of a captured table, with the
-- progress that lets it resume. The snapshot rows themselves go to core.tb_entity_change_log
-- (op 'r', source.snapshot = 'incremental', modification_type 'NOOP', change_status 'existing'),
-- written by the library (src/backfill.rs) in the same transaction as the page they copy.
--
-- Invariants:
-- * At most one unfinished (running) backfill per table; a new one for the same table resumes it
--   (same predicate and observers) or is refused.
-- * last_key is the primary key (text form, one element per key column) of the last row copied;
--   it moves in the transaction that wrote that page's snapshot rows, so a crash resumes after the
--   last committed page and never skips a row.
-- * A backfill being run holds the session advisory lock (LOCK_CLASS in src/backfill.rs, id), so
--   two processes never run the same backfill.
CREATE TABLE IF NOT EXISTS core.observer_backfill (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name regclass NOT NULL,
    predicate TEXT,
    observers TEXT[] NOT NULL DEFAULT '{}',
    tenant UUID,
    batch_size INTEGER NOT NULL CHECK (batch_size > 0),
    rate_per_second INTEGER CHECK (rate_per_second > 0),
    state TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'cancelled')),
    last_key TEXT[],
    rows_done BIGINT NOT NULL DEFAULT 0,
    rows_estimate BIGINT,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);

CREATE UNIQUE INDEX IF NOT EXISTS observer_backfill_one_running
    ON core.observer_backfill (table_name) WHERE state = 'running';

COMMENT ON TABLE core.observer_backfill IS
    'fraiseql-observers: backfills of captured tables into the change log (snapshot rows), with their progress.';
