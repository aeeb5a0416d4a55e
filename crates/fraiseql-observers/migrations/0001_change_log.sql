-- The change log (changelog-contract.md section 1), plus the writing transaction's id that the
-- gap-safe reader needs. On a database that already has the table (an existing FraiseQL
-- database, in either table shape) only what is missing is added; no user data is rewritten.
CREATE SCHEMA IF NOT EXISTS core;

DO $migration$
DECLARE
    seq_column TEXT;
BEGIN
    IF to_regclass('core.tb_entity_change_log') IS NULL THEN
        CREATE TABLE core.tb_entity_change_log (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            pk_entity_change_log UUID NOT NULL DEFAULT gen_random_uuid(),

            fk_customer_org UUID NOT NULL,
            fk_contact UUID,

            object_type TEXT NOT NULL,
            object_id UUID NOT NULL,

            modification_type TEXT NOT NULL CHECK (
                modification_type IN ('INSERT', 'UPDATE', 'DELETE', 'NOOP')
            ),

            change_status TEXT NOT NULL CHECK (
                change_status ~ '^(new|existing|updated|deleted|synced|completed|ok|done|success|failed:[a-z_]+|noop:[a-z_]+|conflict:[a-z_]+|duplicate:[a-z_]+|validation:[a-z_]+|not_found|forbidden|unauthorized|blocked:[a-z_]+)$'
            ),

            object_data JSONB NOT NULL,
            extra_metadata JSONB DEFAULT '{}'::jsonb,

            created_at TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP
        );
        CREATE INDEX idx_entity_log_object ON core.tb_entity_change_log (object_type, object_id);
        CREATE INDEX idx_entity_log_org ON core.tb_entity_change_log (fk_customer_org, created_at);
        CREATE INDEX idx_entity_log_status ON core.tb_entity_change_log (change_status);
    END IF;

    -- Metadata-only (the default is STABLE): rows already there get this transaction's id and so
    -- count as committed history.
    ALTER TABLE core.tb_entity_change_log
        ADD COLUMN IF NOT EXISTS txid xid8 NOT NULL DEFAULT pg_current_xact_id();

    -- The monotonic number is `id` in the mission's shape, `pk_entity_change_log` in the later one.
    SELECT a.attname INTO seq_column
      FROM pg_attribute a
     WHERE a.attrelid = 'core.tb_entity_change_log'::regclass
       AND a.attname IN ('id', 'pk_entity_change_log')
       AND a.atttypid = 'bigint'::regtype
       AND NOT a.attisdropped;
    IF seq_column IS NULL THEN
        RAISE EXCEPTION 'fraiseql-observers: core.tb_entity_change_log has neither a BIGINT id nor a BIGINT pk_entity_change_log column; cannot tell its shape';
    END IF;
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS idx_entity_log_txid ON core.tb_entity_change_log (txid, %I)',
        seq_column);
END
$migration$;
