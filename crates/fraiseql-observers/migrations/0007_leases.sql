-- Leases and claims: dead-letter retries finished only by their claimant; sleeping parked retries.

-- Operator retries of dead letters are finished only by the operator holding them: a claim
-- carries a token, and finishing a retry requires it (a retry whose lease ran out and was
-- claimed by someone else cannot flip the item back).
ALTER TABLE core.observer_dlq_items ADD COLUMN IF NOT EXISTS claim_token UUID;

-- Items parked behind an earlier one of their (observer, entity) may sleep: the retry worker
-- skips them until the item ahead of them leaves the queue (which wakes the next one), so its
-- claims do not cost one probe per parked item on every poll. Claims scan awake items only.
ALTER TABLE core.observer_retry_queue ADD COLUMN IF NOT EXISTS dormant BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS idx_observer_retry_awake
    ON core.observer_retry_queue (consumer_id, next_attempt_at) WHERE NOT dormant;
