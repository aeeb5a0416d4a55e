-- Runtime control without a restart: paused observers and reload requests, per consumer.

-- Observers an operator paused (`fraiseql-observers pause`). While a row exists, the leader of
-- the consumer sends nothing through that observer: its deliveries wait in the retry queue, in
-- order, with their attempts unchanged, and the retry worker does not claim them. Deleting the
-- row (`resume`) makes them due again. Durable: kept across restarts and failovers.
CREATE TABLE IF NOT EXISTS core.observer_paused (
    consumer_id TEXT NOT NULL,
    observer TEXT NOT NULL,
    paused_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_id, observer)
);

-- Reload requests (`fraiseql-observers reload`): the command bumps `requested`; each daemon of
-- the consumer re-reads its configuration file when it sees a generation it has not handled, and
-- records the outcome (`answered`, `result`, `errors`) for the command to print.
CREATE TABLE IF NOT EXISTS core.observer_reload_requests (
    consumer_id TEXT PRIMARY KEY,
    requested BIGINT NOT NULL DEFAULT 0,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    answered BIGINT NOT NULL DEFAULT 0,
    answered_at TIMESTAMPTZ,
    result TEXT CHECK (result IN ('ok', 'error')),
    errors TEXT
);

-- A retry whose observer no longer accepts its event is dead-lettered as `not_accepted`.
ALTER TABLE core.observer_dlq_items DROP CONSTRAINT IF EXISTS observer_dlq_items_reason_check;
ALTER TABLE core.observer_dlq_items ADD CONSTRAINT observer_dlq_items_reason_check
    CHECK (reason IN ('exhausted', 'permanent', 'gone', 'not_accepted'));
