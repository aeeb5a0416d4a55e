-- Capture without privilege escalation (issue 9, 5b).
--
-- Until this migration the generated trigger function core.observer_capture_<oid>() was SECURITY
-- DEFINER and serialised the rows itself (to_jsonb(n.*)). Serialising runs code the table's users
-- may own (a cast of a column type to json), so that code ran with the rights of whoever enabled
-- capture (often a superuser). Now:
--
-- * The generated trigger function is SECURITY INVOKER: the images, the ids and the tenant
--   column are read as the writer, with the writer's rights.
-- * It hands the finished values (op, entity id, tenant column, before and after images as jsonb)
--   to fraiseql_capture.write, the only SECURITY DEFINER function on the path. That function runs
--   no code of the table's users: it reads the registry (entity name, id and tenant columns), fills
--   the tenant from fraiseql.tenant_id where the column is NULL, the author from
--   fraiseql.contact_id and the source block, and inserts the rows into the change log in the
--   order given (so per entity the change-log id is still drawn in commit order, under the row
--   lock, by the AFTER trigger).
-- * fraiseql_capture.write refuses to run outside a trigger (pg_trigger_depth() = 0) and for a table that
--   is not in the registry: a writer cannot append rows to the log with a plain SELECT, and the
--   entity name always comes from the registry. It lives in its own schema, fraiseql_capture, with
--   USAGE granted to PUBLIC, so writers need no privilege on the schema core or on the change log
--   (the contract of 0004 is kept). A role that owns a trigger of its own could still call it
--   from that trigger and append rows for a captured table; to close that too,
--   REVOKE EXECUTE ON FUNCTION fraiseql_capture.write(regclass, fraiseql_capture.change[]) FROM PUBLIC
--   and grant it to the roles that write captured tables.
-- * Every table captured before this migration gets the new trigger function here (capture is
--   enabled again with its registered settings; enabled_at is kept). A table that can no longer
--   be enabled (its id or tenant column was renamed or retyped) is left as it is with a WARNING
--   naming it: run `fraiseql-observers capture enable` for it.
--
-- core.observer_capture_tenant/contact/missing_id/source keep their definitions (0004); they are
-- now called only by fraiseql_capture.write.

CREATE SCHEMA IF NOT EXISTS fraiseql_capture;
GRANT USAGE ON SCHEMA fraiseql_capture TO PUBLIC;
COMMENT ON SCHEMA fraiseql_capture IS
    'fraiseql-observers: what a captured write calls (writers get USAGE, nothing else lives here).';

-- One change of a captured row, as the writer's trigger built it. op is c, u or d.
CREATE TYPE fraiseql_capture.change AS (
    op TEXT,
    object_id UUID,
    tenant UUID,
    before JSONB,
    after JSONB
);

CREATE FUNCTION fraiseql_capture.write(p_table regclass, p_changes fraiseql_capture.change[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_entity TEXT;
    v_id_column TEXT;
    v_tenant_column TEXT;
    v_schema TEXT;
    v_name TEXT;
    v_table TEXT;
BEGIN
    IF pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = 'fraiseql-observers: fraiseql_capture.write is called only by capture triggers';
    END IF;
    IF p_changes IS NULL OR cardinality(p_changes) = 0 THEN
        RETURN;
    END IF;
    SELECT r.entity, r.id_column, r.tenant_column, n.nspname, c.relname
      INTO v_entity, v_id_column, v_tenant_column, v_schema, v_name
      FROM core.observer_capture r
      JOIN pg_class c ON c.oid = r.table_name
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE r.table_name = p_table;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = format('fraiseql-observers: %s is not captured', p_table);
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_changes) AS c WHERE c.op IS NULL OR c.op NOT IN ('c', 'u', 'd')) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'fraiseql-observers: a captured change has an op other than c, u or d';
    END IF;
    v_table := format('%I.%I', v_schema, v_name);

    INSERT INTO core.tb_entity_change_log
           (fk_customer_org, fk_contact, object_type, object_id, modification_type, change_status, object_data)
    SELECT COALESCE(c.tenant, (SELECT core.observer_capture_tenant(v_table, v_tenant_column))),
           (SELECT core.observer_capture_contact(v_table)),
           v_entity,
           COALESCE(c.object_id, (SELECT core.observer_capture_missing_id(v_table, v_id_column))),
           CASE c.op WHEN 'c' THEN 'INSERT' WHEN 'u' THEN 'UPDATE' ELSE 'DELETE' END,
           CASE c.op WHEN 'c' THEN 'new' WHEN 'u' THEN 'updated' ELSE 'deleted' END,
           jsonb_build_object('before', c.before, 'after', c.after, 'op', c.op,
                              'source', (SELECT core.observer_capture_source(v_schema, v_name)))
      FROM unnest(p_changes) WITH ORDINALITY AS c(op, object_id, tenant, before, after, ord)
     ORDER BY c.ord;
END
$function$;

REVOKE ALL ON FUNCTION fraiseql_capture.write(regclass, fraiseql_capture.change[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fraiseql_capture.write(regclass, fraiseql_capture.change[]) TO PUBLIC;
COMMENT ON FUNCTION fraiseql_capture.write(regclass, fraiseql_capture.change[]) IS
    'fraiseql-observers: appends the changes a capture trigger built to core.tb_entity_change_log (only from a trigger, only for a captured table).';

CREATE OR REPLACE FUNCTION core.observer_enable_capture(
    p_table regclass,
    p_entity TEXT,
    p_tenant_column TEXT DEFAULT NULL,
    p_exclude_columns TEXT[] DEFAULT '{}',
    p_id_column TEXT DEFAULT 'id'
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $enable$
DECLARE
    v_name TEXT;
    v_relkind "char";
    v_type REGTYPE;
    v_missing TEXT;
    v_key TEXT[];
    v_join TEXT;
    v_function TEXT := format('core.observer_capture_%s', p_table::oid);
    v_excl TEXT := '';
    v_tenant_n TEXT;
    v_tenant_o TEXT;
    v_body TEXT;
BEGIN
    p_exclude_columns := COALESCE(p_exclude_columns, '{}');
    p_id_column := COALESCE(p_id_column, 'id');

    SELECT format('%I.%I', n.nspname, c.relname), c.relkind
      INTO v_name, v_relkind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table;
    IF v_name IS NULL THEN
        RAISE EXCEPTION 'fraiseql-observers: cannot enable capture: no table with oid %', p_table::oid;
    END IF;
    IF v_relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION USING
            ERRCODE = 'wrong_object_type',
            MESSAGE = format('fraiseql-observers: cannot enable capture on %s: it is not a table', v_name);
    END IF;
    IF p_table = 'core.tb_entity_change_log'::regclass THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'fraiseql-observers: cannot enable capture on the change log itself';
    END IF;
    IF (SELECT count(*)
          FROM pg_attribute a
         WHERE a.attrelid = 'core.tb_entity_change_log'::regclass
           AND NOT a.attisdropped
           AND (a.attname, a.atttypid) IN (
                ('id', 'bigint'::regtype),
                ('pk_entity_change_log', 'uuid'::regtype),
                ('fk_customer_org', 'uuid'::regtype),
                ('fk_contact', 'uuid'::regtype),
                ('object_data', 'jsonb'::regtype))) <> 5
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'feature_not_supported',
            MESSAGE = format('fraiseql-observers: cannot enable capture on %s: core.tb_entity_change_log is not in the mission''s shape (UUID pk_entity_change_log, UUID fk_customer_org, envelope in object_data)', v_name),
            HINT = 'Later FraiseQL releases write their own change-log rows; capture is only for the mission''s table shape.';
    END IF;
    IF p_entity IS NULL OR btrim(p_entity) = '' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('fraiseql-observers: cannot enable capture on %s: the entity name (object_type) is empty', v_name);
    END IF;

    -- The entity id column: present, and a uuid.
    SELECT a.atttypid::regtype INTO v_type
      FROM pg_attribute a
     WHERE a.attrelid = p_table AND a.attname = p_id_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_type IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'undefined_column',
            MESSAGE = format('fraiseql-observers: cannot enable capture on %s: it has no column %I (the entity id column)', v_name, p_id_column),
            HINT = 'Name the table''s UUID id column (p_id_column).';
    END IF;
    IF v_type <> 'uuid'::regtype THEN
        RAISE EXCEPTION USING
            ERRCODE = 'datatype_mismatch',
            MESSAGE = format('fraiseql-observers: cannot enable capture on %s: column %I (the entity id column) is %s, not uuid', v_name, p_id_column, v_type);
    END IF;

    -- The tenant column, when one is named: present, and a uuid.
    IF p_tenant_column IS NOT NULL THEN
        v_type := NULL;
        SELECT a.atttypid::regtype INTO v_type
          FROM pg_attribute a
         WHERE a.attrelid = p_table AND a.attname = p_tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_type IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = 'undefined_column',
                MESSAGE = format('fraiseql-observers: cannot enable capture on %s: it has no column %I (the tenant column)', v_name, p_tenant_column);
        END IF;
        IF v_type <> 'uuid'::regtype THEN
            RAISE EXCEPTION USING
                ERRCODE = 'datatype_mismatch',
                MESSAGE = format('fraiseql-observers: cannot enable capture on %s: column %I (the tenant column) is %s, not uuid', v_name, p_tenant_column, v_type);
        END IF;
    END IF;

    -- Every excluded column exists (a typo would otherwise leak the column it meant to hide).
    SELECT string_agg(format('%I', x), ', ') INTO v_missing
      FROM unnest(p_exclude_columns) AS x
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = p_table AND a.attname = x AND a.attnum > 0 AND NOT a.attisdropped);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'undefined_column',
            MESSAGE = format('fraiseql-observers: cannot enable capture on %s: excluded column(s) %s do not exist', v_name, v_missing);
    END IF;

    -- The key that pairs old and new rows of an UPDATE: the primary key, else the id column.
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_key
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = p_table AND i.indisprimary;
    IF v_key IS NULL THEN
        v_key := ARRAY[p_id_column];
    END IF;
    SELECT string_agg(format('o.%1$I = n.%1$I', k), ' AND ') INTO v_join FROM unnest(v_key) AS k;

    IF cardinality(p_exclude_columns) > 0 THEN
        v_excl := format(' - %L::text[]', p_exclude_columns::text);
    END IF;
    IF p_tenant_column IS NULL THEN
        v_tenant_n := 'NULL::uuid';
        v_tenant_o := 'NULL::uuid';
    ELSE
        v_tenant_n := format('n.%I', p_tenant_column);
        v_tenant_o := format('o.%I', p_tenant_column);
    END IF;

    -- Every column reference in the generated SQL is qualified (n.col, o.col, n.* for the whole
    -- row), so user columns named n, o or tg_op cannot collide with the aliases; use_variable
    -- settles the remaining unqualified names in favour of the variables.
    v_body := format($template$
#variable_conflict use_variable
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM fraiseql_capture.write(TG_RELID::regclass, ARRAY(
            SELECT ROW('c', n.%1$I, %2$s, NULL::jsonb, to_jsonb(n.*)%3$s)::fraiseql_capture.change
              FROM observer_new n));
    ELSIF TG_OP = 'UPDATE' THEN
        -- Old rows whose key is gone (key changed): deleted, logged before the creations below.
        PERFORM fraiseql_capture.write(TG_RELID::regclass, ARRAY(
            SELECT ROW('d', o.%1$I, %4$s, to_jsonb(o.*)%3$s, NULL::jsonb)::fraiseql_capture.change
              FROM observer_old o
             WHERE NOT EXISTS (SELECT 1 FROM observer_new n WHERE %5$s)));
        -- Paired rows that differ (full binary image, excluded columns included), and new keys.
        PERFORM fraiseql_capture.write(TG_RELID::regclass, ARRAY(
            SELECT ROW(CASE WHEN o.%6$I IS NULL THEN 'c' ELSE 'u' END, n.%1$I, %2$s,
                       to_jsonb(o.*)%3$s, to_jsonb(n.*)%3$s)::fraiseql_capture.change
              FROM observer_new n LEFT JOIN observer_old o ON %5$s
             WHERE o.%6$I IS NULL OR o.* OPERATOR(pg_catalog.*<>) n.*));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM fraiseql_capture.write(TG_RELID::regclass, ARRAY(
            SELECT ROW('d', o.%1$I, %4$s, to_jsonb(o.*)%3$s, NULL::jsonb)::fraiseql_capture.change
              FROM observer_old o));
    END IF;
    RETURN NULL;
END
$template$,
        p_id_column, v_tenant_n, v_excl, v_tenant_o, v_join, v_key[1]);

    -- SECURITY INVOKER: the rows are serialised as the writer (see the top of this file).
    -- enable_nestloop = off: the plans of the joins above are cached per session, sized by the
    -- transition tables of the statement that first ran them; hash joins are right at every size
    -- (see 0004).
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER '
        'SET search_path = pg_catalog, pg_temp SET enable_nestloop = off AS %L',
        v_function, v_body);
    EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_function,
                   format('fraiseql-observers: captures changes of %s as %s (generated by core.observer_enable_capture)', v_name, p_entity));

    PERFORM core.observer_capture_drop_triggers(p_table);
    EXECUTE format('CREATE TRIGGER observer_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS observer_new FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   p_table, v_function);
    EXECUTE format('CREATE TRIGGER observer_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS observer_old NEW TABLE AS observer_new FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   p_table, v_function);
    EXECUTE format('CREATE TRIGGER observer_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS observer_old FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   p_table, v_function);

    PERFORM core.observer_capture_forget_dropped();
    INSERT INTO core.observer_capture (table_name, entity, id_column, tenant_column, exclude_columns)
    VALUES (p_table, p_entity, p_id_column, p_tenant_column, p_exclude_columns)
    ON CONFLICT (table_name) DO UPDATE
       SET entity = EXCLUDED.entity,
           id_column = EXCLUDED.id_column,
           tenant_column = EXCLUDED.tenant_column,
           exclude_columns = EXCLUDED.exclude_columns,
           enabled_at = now();
END
$enable$;

COMMENT ON FUNCTION core.observer_enable_capture(regclass, TEXT, TEXT, TEXT[], TEXT) IS
    'fraiseql-observers: log every INSERT/UPDATE/DELETE of a table into core.tb_entity_change_log (idempotent).';

-- Every table captured so far gets the new (SECURITY INVOKER) trigger function.
DO $regenerate$
DECLARE
    r RECORD;
BEGIN
    FOR r IN
        SELECT c.table_name, c.entity, c.tenant_column, c.exclude_columns, c.id_column, c.enabled_at
          FROM core.observer_capture c
         WHERE EXISTS (SELECT 1 FROM pg_class k WHERE k.oid = c.table_name::oid)
    LOOP
        BEGIN
            PERFORM core.observer_enable_capture(r.table_name, r.entity, r.tenant_column,
                                                 r.exclude_columns, r.id_column);
            UPDATE core.observer_capture SET enabled_at = r.enabled_at WHERE table_name = r.table_name;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'fraiseql-observers: capture of % was not regenerated (%): run `fraiseql-observers capture enable` for it',
                r.table_name, SQLERRM;
        END;
    END LOOP;
END
$regenerate$;
