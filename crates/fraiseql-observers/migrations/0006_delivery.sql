-- Durable delivery: failures waiting for a retry, and dead letters.

-- Action deliveries that failed and wait for another attempt, and the deliveries parked behind
-- them. For an ordered observer, the item with the lowest (event_sequence, action_index) of an
-- (observer, entity) is its head: only heads are attempted, so one entity's deliveries keep their
-- order while every other entity flows. The event is copied in, so pruning the change log never
-- breaks a pending retry.
CREATE TABLE IF NOT EXISTS core.observer_retry_queue (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_id TEXT NOT NULL,
    observer TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    action_type TEXT NOT NULL,
    entity_key TEXT NOT NULL,
    ordered BOOLEAN NOT NULL,
    event_id UUID NOT NULL,
    event_sequence BIGINT NOT NULL,
    event JSONB NOT NULL,
    delivery_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_until TIMESTAMPTZ,
    last_error TEXT,
    history JSONB NOT NULL DEFAULT '[]'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer_id, delivery_id)
);
CREATE INDEX IF NOT EXISTS idx_observer_retry_due
    ON core.observer_retry_queue (consumer_id, next_attempt_at);
CREATE INDEX IF NOT EXISTS idx_observer_retry_order
    ON core.observer_retry_queue (consumer_id, observer, entity_key, event_sequence, action_index);

-- Deliveries that will not succeed by retrying: retries exhausted, or a permanent error. The
-- event is copied in. `history` lists every attempt and every operator action, oldest first.
CREATE TABLE IF NOT EXISTS core.observer_dlq_items (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_id TEXT NOT NULL,
    observer TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    action_type TEXT NOT NULL,
    entity_key TEXT NOT NULL,
    event_id UUID NOT NULL,
    event_sequence BIGINT NOT NULL,
    event JSONB NOT NULL,
    delivery_id TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL CHECK (reason IN ('exhausted', 'permanent', 'gone')),
    last_error TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'retrying', 'delivered', 'discarded')),
    claimed_until TIMESTAMPTZ,
    history JSONB NOT NULL DEFAULT '[]'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer_id, delivery_id)
);
CREATE INDEX IF NOT EXISTS idx_observer_dlq_status
    ON core.observer_dlq_items (status, created_at);
