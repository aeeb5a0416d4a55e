-- core.log_mutation_event: the helper FraiseQL mutation functions call to log one change
-- (schema-conventions section 6.4; changelog-contract.md section 1). It writes one row of
-- core.tb_entity_change_log in the caller's transaction, with the Debezium envelope
--   {before, after, op, source: {schema, table, db, organization, txId, ts_ms, ts_us}}
-- in object_data, and returns the row's pk_entity_change_log (the event id).
--
-- op: INSERT -> c, UPDATE -> u, DELETE -> d, NOOP -> r ("here is the current state, nothing
-- changed", like Debezium's read). Any other modification_type raises an exception.
--
-- Only installed on the mission's table shape (BIGINT id, UUID pk_entity_change_log, UUID
-- fk_customer_org, envelope in object_data). A database holding the later FraiseQL shape (BIGINT
-- pk_entity_change_log, UUID id, object_data = after-image, object_data_before, tenant_id) gets
-- nothing here: FraiseQL ships its own log_mutation_event for that shape, and this body would write
-- the wrong columns.
DO $migration$
BEGIN
    IF (SELECT count(*)
          FROM pg_attribute a
         WHERE a.attrelid = 'core.tb_entity_change_log'::regclass
           AND NOT a.attisdropped
           AND (a.attname, a.atttypid) IN (
                ('id', 'bigint'::regtype),
                ('pk_entity_change_log', 'uuid'::regtype),
                ('fk_customer_org', 'uuid'::regtype),
                ('object_data', 'jsonb'::regtype))) <> 4
    THEN
        RAISE NOTICE 'fraiseql-observers: core.tb_entity_change_log is not in the mission''s shape; core.log_mutation_event is not installed (FraiseQL ships its own)';
        RETURN;
    END IF;

    CREATE OR REPLACE FUNCTION core.log_mutation_event(
        input_fk_customer_org UUID,
        input_fk_contact UUID,
        input_object_type TEXT,
        input_object_id UUID,
        input_modification_type TEXT,
        input_change_status TEXT,
        input_payload_before JSONB DEFAULT NULL,
        input_payload_after JSONB DEFAULT NULL,
        input_source_table TEXT DEFAULT NULL,
        input_source_schema TEXT DEFAULT 'public',
        input_extra_metadata JSONB DEFAULT '{}'::jsonb
    ) RETURNS UUID
    LANGUAGE plpgsql
    VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $function$
    DECLARE
        v_op TEXT;
        v_ts_us BIGINT := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
        v_pk UUID;
    BEGIN
        v_op := CASE input_modification_type
                    WHEN 'INSERT' THEN 'c'
                    WHEN 'UPDATE' THEN 'u'
                    WHEN 'DELETE' THEN 'd'
                    WHEN 'NOOP' THEN 'r'
                END;
        IF v_op IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('fraiseql-observers: log_mutation_event: unknown modification_type %L',
                                 input_modification_type),
                HINT = 'Use INSERT, UPDATE, DELETE or NOOP.';
        END IF;
        IF input_fk_customer_org IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = 'not_null_violation',
                MESSAGE = format('fraiseql-observers: log_mutation_event: no tenant (input_fk_customer_org is NULL) for %s %s',
                                 input_object_type, input_object_id);
        END IF;

        INSERT INTO core.tb_entity_change_log (
            fk_customer_org, fk_contact, object_type, object_id, modification_type, change_status,
            object_data, extra_metadata)
        VALUES (
            input_fk_customer_org, input_fk_contact, input_object_type, input_object_id,
            input_modification_type, input_change_status,
            jsonb_build_object(
                'before', input_payload_before,
                'after', input_payload_after,
                'op', v_op,
                'source', jsonb_build_object(
                    'schema', input_source_schema,
                    'table', input_source_table,
                    'db', current_database(),
                    'organization', input_fk_customer_org::text,
                    'txId', pg_current_xact_id()::text::bigint,
                    'ts_ms', v_ts_us / 1000,
                    'ts_us', v_ts_us)),
            COALESCE(input_extra_metadata, '{}'::jsonb))
        RETURNING pk_entity_change_log INTO v_pk;
        RETURN v_pk;
    END
    $function$;

    COMMENT ON FUNCTION core.log_mutation_event(UUID, UUID, TEXT, UUID, TEXT, TEXT, JSONB, JSONB, TEXT, TEXT, JSONB) IS
        'fraiseql-observers: log one mutation into core.tb_entity_change_log (Debezium envelope in object_data) in the caller''s transaction; returns pk_entity_change_log.';
END
$migration$;
