-- What a captured write costs the writer (issue 12, item 4). fraiseql_capture.write (0008) is
-- replaced by a version that does the same with less work per statement:
--
-- * No join in its statements. The generated trigger function runs with enable_nestloop = off
--   (0004: its UPDATE joins), and fraiseql_capture.write inherited that setting: its registry
--   lookup (observer_capture JOIN pg_class JOIN pg_namespace) was planned with the nested loop's
--   disable cost, far above jit_above_cost, so with PostgreSQL's default jit = on every captured
--   statement JIT-compiled that lookup (about 70 ms): 13 single-row inserts per second instead of
--   about 2,000. The lookup now reads the registry alone (one index probe); the table's schema
--   and name come from the regclass's own text (parse_ident), and the function runs with
--   jit = off (a capture statement has nothing for JIT to win).
-- * No separate statements for what a plain expression does: the op check is made while the rows
--   are inserted (an op other than c, u or d raises the same error as before, through
--   core.observer_capture_bad_op), the author and the source block are computed once per statement
--   as PL/pgSQL expressions (what core.observer_capture_contact and core.observer_capture_source
--   compute, inlined), the tenant and missing-id fallbacks are called only for a row that needs
--   them, and the rows are inserted in the order given without a sort (a function scan of the
--   array yields them in array order; per entity a statement holds one change, so the order
--   across entities within a statement is not a guarantee the log makes).
--
-- Nothing else changes: the signature, the rights (SECURITY DEFINER, EXECUTE granted to PUBLIC,
-- only from a trigger, only for a registered table), the rows written, the error codes and
-- messages. The generated trigger functions call fraiseql_capture.write by name, so they need no
-- regeneration. Measured in BENCHMARKS.md ("Capture cost").

CREATE OR REPLACE FUNCTION core.observer_capture_bad_op(p_op TEXT)
RETURNS TEXT
LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'invalid_parameter_value',
        MESSAGE = 'fraiseql-observers: a captured change has an op other than c, u or d';
END
$function$;

CREATE OR REPLACE FUNCTION fraiseql_capture.write(p_table regclass, p_changes fraiseql_capture.change[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $function$
DECLARE
    v_entity TEXT;
    v_id_column TEXT;
    v_tenant_column TEXT;
    v_ident TEXT[];
    v_schema TEXT;
    v_name TEXT;
    v_table TEXT;
    v_setting TEXT;
    v_contact UUID;
    v_ts_us BIGINT;
    v_source JSONB;
BEGIN
    IF pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = 'fraiseql-observers: fraiseql_capture.write is called only by capture triggers';
    END IF;
    IF p_changes IS NULL OR cardinality(p_changes) = 0 THEN
        RETURN;
    END IF;
    SELECT r.entity, r.id_column, r.tenant_column
      INTO v_entity, v_id_column, v_tenant_column
      FROM core.observer_capture r
     WHERE r.table_name = p_table;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = format('fraiseql-observers: %s is not captured', p_table);
    END IF;
    -- With search_path = pg_catalog, pg_temp a regclass prints as schema.name, each part quoted
    -- where it needs to be; only a table of pg_temp prints unqualified.
    v_ident := parse_ident(p_table::text);
    IF cardinality(v_ident) = 2 THEN
        v_schema := v_ident[1];
        v_name := v_ident[2];
    ELSE
        SELECT n.nspname, c.relname INTO v_schema, v_name
          FROM pg_class c, pg_namespace n
         WHERE c.oid = p_table AND n.oid = c.relnamespace;
    END IF;
    v_table := format('%I.%I', v_schema, v_name);

    -- core.observer_capture_contact, inlined.
    v_setting := NULLIF(current_setting('fraiseql.contact_id', true), '');
    IF v_setting IS NOT NULL THEN
        v_contact := core.observer_capture_setting_uuid(v_table, 'fraiseql.contact_id', v_setting);
    END IF;
    -- core.observer_capture_source, inlined: one timestamp for all the statement's rows.
    v_ts_us := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    v_source := jsonb_build_object(
        'schema', v_schema,
        'table', v_name,
        'db', current_database(),
        'txId', pg_current_xact_id()::text::bigint,
        'ts_ms', v_ts_us / 1000,
        'ts_us', v_ts_us);

    INSERT INTO core.tb_entity_change_log
           (fk_customer_org, fk_contact, object_type, object_id, modification_type, change_status, object_data)
    SELECT COALESCE(c.tenant, core.observer_capture_tenant(v_table, v_tenant_column)),
           v_contact,
           v_entity,
           COALESCE(c.object_id, core.observer_capture_missing_id(v_table, v_id_column)),
           CASE c.op WHEN 'c' THEN 'INSERT' WHEN 'u' THEN 'UPDATE' WHEN 'd' THEN 'DELETE'
                     ELSE core.observer_capture_bad_op(c.op) END,
           CASE c.op WHEN 'c' THEN 'new' WHEN 'u' THEN 'updated' ELSE 'deleted' END,
           jsonb_build_object('before', c.before, 'after', c.after, 'op', c.op, 'source', v_source)
      FROM unnest(p_changes) AS c;
END
$function$;
