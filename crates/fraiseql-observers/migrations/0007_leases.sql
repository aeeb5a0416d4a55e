-- Operator retries of dead letters are finished only by the operator holding them: a claim
-- carries a token, and finishing a retry requires it (a retry whose lease ran out and was
-- claimed by someone else cannot flip the item back).
ALTER TABLE core.observer_dlq_items ADD COLUMN IF NOT EXISTS claim_token UUID;
