-- The capture trigger any table can opt into (changelog-contract.md section 4).
--
--   SELECT core.observer_enable_capture('public.tb_user', 'User', 'fk_customer_org', '{password_hash}');
--
-- writes one row of core.tb_entity_change_log (mission shape) per row inserted, updated or deleted
-- in public.tb_user, in the writer's transaction, with the Debezium envelope
--   {"before", "after", "op": c|u|d, "source": {"schema", "table", "db", "txId", "ts_ms", "ts_us"}}
-- in object_data. before/after are to_jsonb(row) minus the excluded columns (snake_case column
-- names, pk_/fk_ columns included); before is null for c, after is null for d.
--
-- Invariants:
-- * The triggers are AFTER ... FOR EACH STATEMENT with transition tables: one set-based
--   INSERT ... SELECT per statement. Never BEFORE: the reader's per-entity order relies on the
--   change-log id being drawn after the row is written, while its row lock is held.
-- * Each captured table gets a generated trigger function core.observer_capture_<table oid>() with
--   static SQL (plans are cached per session). Enabling again regenerates it (idempotent); after
--   renaming or retyping the id, tenant or primary-key columns, enable again.
-- * UPDATE pairs old and new rows by the table's primary key (the id column when there is none).
--   A new row without an old partner (key changed) is logged as 'c', an old row without a new
--   partner as 'd', and the 'd' rows are written first.
-- * A no-op update (UPDATE t SET x = x) logs nothing. Rows are compared by their full binary
--   image, including excluded columns: an update that changes only an excluded column IS a change
--   and is logged, with equal before/after images (the observer can tell "something it may not
--   see changed" from "nothing changed").
-- * Tenant (fk_customer_org) comes from the tenant column, else from the session setting
--   fraiseql.tenant_id. A row with neither fails the user's write with a clear error (never a
--   silently dropped change). The setting is read once per statement and only when some row needs
--   it. The author (fk_contact) comes from fraiseql.contact_id (absent -> NULL). A malformed
--   setting fails the write.
-- * The generated function is SECURITY DEFINER (owned by whoever enabled capture), so writers of a
--   captured table need no privilege on the change log and cannot forge rows in it directly.
-- * TRUNCATE is not captured (there are no rows to log).
--
-- Only the mission's table shape is supported; on the later FraiseQL shape enabling capture fails
-- with a clear message (FraiseQL writes that shape itself).

CREATE TABLE IF NOT EXISTS core.observer_capture (
    table_name regclass PRIMARY KEY,
    entity TEXT NOT NULL,
    id_column TEXT NOT NULL DEFAULT 'id',
    tenant_column TEXT,
    exclude_columns TEXT[] NOT NULL DEFAULT '{}',
    enabled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMENT ON TABLE core.observer_capture IS
    'fraiseql-observers: tables whose changes are captured into core.tb_entity_change_log (see core.observer_enable_capture).';

-- A session setting that must hold a UUID. Raises a clear error naming the table otherwise.
CREATE OR REPLACE FUNCTION core.observer_capture_setting_uuid(p_table TEXT, p_setting TEXT, p_value TEXT)
RETURNS UUID
LANGUAGE plpgsql
AS $function$
BEGIN
    -- The usual spelling is checked without a subtransaction; anything else is left to the uuid
    -- input function (which also accepts braces and missing hyphens).
    IF p_value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
        RETURN p_value::uuid;
    END IF;
    BEGIN
        RETURN p_value::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_text_representation',
            MESSAGE = format('fraiseql-observers: cannot capture a change of %s: %s is not a UUID (%L)',
                             p_table, p_setting, left(p_value, 80)),
            HINT = format('Set %s to a UUID, or reset it.', p_setting);
    END;
END
$function$;

-- The tenant of rows whose tenant column is NULL (or of tables without one): fraiseql.tenant_id.
-- A custom setting reads '' after a rolled-back SET LOCAL, hence the NULLIF.
CREATE OR REPLACE FUNCTION core.observer_capture_tenant(p_table TEXT, p_tenant_column TEXT)
RETURNS UUID
LANGUAGE plpgsql
AS $function$
DECLARE
    v_setting TEXT := NULLIF(current_setting('fraiseql.tenant_id', true), '');
BEGIN
    IF v_setting IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'not_null_violation',
            MESSAGE = format('fraiseql-observers: cannot capture a change of %s: no tenant (%s)',
                p_table,
                CASE WHEN p_tenant_column IS NULL
                     THEN 'the table has no tenant column and fraiseql.tenant_id is not set'
                     ELSE format('column %s is NULL and fraiseql.tenant_id is not set', p_tenant_column)
                END),
            HINT = CASE WHEN p_tenant_column IS NULL
                        THEN 'Set the tenant of the transaction first: SET LOCAL fraiseql.tenant_id = ''<tenant uuid>''.'
                        ELSE format('Fill %s, or set the tenant of the transaction first: SET LOCAL fraiseql.tenant_id = ''<tenant uuid>''.',
                                    p_tenant_column)
                   END;
    END IF;
    RETURN core.observer_capture_setting_uuid(p_table, 'fraiseql.tenant_id', v_setting);
END
$function$;

-- The author of the statement's changes: fraiseql.contact_id, or NULL when it is not set.
CREATE OR REPLACE FUNCTION core.observer_capture_contact(p_table TEXT)
RETURNS UUID
LANGUAGE plpgsql
AS $function$
DECLARE
    v_setting TEXT := NULLIF(current_setting('fraiseql.contact_id', true), '');
BEGIN
    IF v_setting IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN core.observer_capture_setting_uuid(p_table, 'fraiseql.contact_id', v_setting);
END
$function$;

-- Called only for a row whose id column is NULL: the change cannot be logged, so the write fails.
CREATE OR REPLACE FUNCTION core.observer_capture_missing_id(p_table TEXT, p_id_column TEXT)
RETURNS UUID
LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'not_null_violation',
        MESSAGE = format('fraiseql-observers: cannot capture a change of %s: column %s (the entity id) is NULL',
                         p_table, p_id_column);
END
$function$;

-- The envelope's source block, computed once per statement (one timestamp for all its rows).
CREATE OR REPLACE FUNCTION core.observer_capture_source(p_schema TEXT, p_table TEXT)
RETURNS JSONB
LANGUAGE plpgsql
AS $function$
DECLARE
    v_ts_us BIGINT := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
BEGIN
    RETURN jsonb_build_object(
        'schema', p_schema,
        'table', p_table,
        'db', current_database(),
        'txId', pg_current_xact_id()::text::bigint,
        'ts_ms', v_ts_us / 1000,
        'ts_us', v_ts_us);
END
$function$;

-- Registry rows (and generated functions) of tables that were dropped since capture was enabled.
CREATE OR REPLACE FUNCTION core.observer_capture_forget_dropped()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_oid OID;
BEGIN
    FOR v_oid IN
        SELECT r.table_name::oid FROM core.observer_capture r
         WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = r.table_name::oid)
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS core.observer_capture_%s()', v_oid);
        DELETE FROM core.observer_capture WHERE table_name::oid = v_oid;
    END LOOP;
END
$function$;

-- Drop the capture triggers of a table (those that exist: no notices).
CREATE OR REPLACE FUNCTION core.observer_capture_drop_triggers(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_trigger NAME;
BEGIN
    FOR v_trigger IN
        SELECT t.tgname FROM pg_trigger t
         WHERE t.tgrelid = p_table
           AND t.tgname IN ('observer_capture_insert', 'observer_capture_update', 'observer_capture_delete')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_table);
    END LOOP;
END
$function$;

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
    v_id_n TEXT;
    v_id_o TEXT;
    v_insert TEXT;
    v_contact TEXT := '(SELECT core.observer_capture_contact(v_table))';
    v_source TEXT := '(SELECT core.observer_capture_source(TG_TABLE_SCHEMA, TG_TABLE_NAME))';
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
        v_tenant_n := '(SELECT core.observer_capture_tenant(v_table, NULL))';
        v_tenant_o := v_tenant_n;
    ELSE
        v_tenant_n := format('COALESCE(n.%I, (SELECT core.observer_capture_tenant(v_table, %L)))', p_tenant_column, p_tenant_column);
        v_tenant_o := format('COALESCE(o.%I, (SELECT core.observer_capture_tenant(v_table, %L)))', p_tenant_column, p_tenant_column);
    END IF;
    v_id_n := format('COALESCE(n.%I, (SELECT core.observer_capture_missing_id(v_table, %L)))', p_id_column, p_id_column);
    v_id_o := format('COALESCE(o.%I, (SELECT core.observer_capture_missing_id(v_table, %L)))', p_id_column, p_id_column);
    v_insert := 'INSERT INTO core.tb_entity_change_log (fk_customer_org, fk_contact, object_type, object_id, modification_type, change_status, object_data)';

    -- Every column reference in the generated SQL is qualified (n.col, o.col, n.* for the whole
    -- row), so user columns named n, o, v_table or tg_op cannot collide with the aliases and the
    -- variables; use_variable settles the remaining unqualified names in favour of the variables.
    v_body := format($template$
#variable_conflict use_variable
DECLARE
    v_table TEXT := format('%%I.%%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
BEGIN
    IF TG_OP = 'INSERT' THEN
        %1$s
        SELECT %2$s, %3$s, %4$L, %5$s, 'INSERT', 'new',
               jsonb_build_object('before', NULL::jsonb, 'after', to_jsonb(n.*)%6$s, 'op', 'c', 'source', %7$s)
          FROM observer_new n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Old rows whose key is gone (key changed): deleted, logged before the creations below.
        %1$s
        SELECT %8$s, %3$s, %4$L, %9$s, 'DELETE', 'deleted',
               jsonb_build_object('before', to_jsonb(o.*)%6$s, 'after', NULL::jsonb, 'op', 'd', 'source', %7$s)
          FROM observer_old o
         WHERE NOT EXISTS (SELECT 1 FROM observer_new n WHERE %10$s);
        -- Paired rows that differ (full binary image, excluded columns included), and new keys.
        %1$s
        SELECT %2$s, %3$s, %4$L, %5$s,
               CASE WHEN o.%11$I IS NULL THEN 'INSERT' ELSE 'UPDATE' END,
               CASE WHEN o.%11$I IS NULL THEN 'new' ELSE 'updated' END,
               jsonb_build_object('before', to_jsonb(o.*)%6$s, 'after', to_jsonb(n.*)%6$s,
                                  'op', CASE WHEN o.%11$I IS NULL THEN 'c' ELSE 'u' END, 'source', %7$s)
          FROM observer_new n LEFT JOIN observer_old o ON %10$s
         WHERE o.%11$I IS NULL OR o.* OPERATOR(pg_catalog.*<>) n.*;
    ELSIF TG_OP = 'DELETE' THEN
        %1$s
        SELECT %8$s, %3$s, %4$L, %9$s, 'DELETE', 'deleted',
               jsonb_build_object('before', to_jsonb(o.*)%6$s, 'after', NULL::jsonb, 'op', 'd', 'source', %7$s)
          FROM observer_old o;
    END IF;
    RETURN NULL;
END
$template$,
        v_insert, v_tenant_n, v_contact, p_entity, v_id_n, v_excl, v_source, v_tenant_o, v_id_o,
        v_join, v_key[1]);

    -- enable_nestloop = off: the plans of the joins above are cached per session, sized by the
    -- transition tables of the statement that first ran them. Planned for a one-row UPDATE they
    -- become nested loops, and a later 50,000-row UPDATE then never finishes (measured: > 60 s
    -- instead of ~1 s). Hash joins are right at every size.
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
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

CREATE OR REPLACE FUNCTION core.observer_disable_capture(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    PERFORM core.observer_capture_drop_triggers(p_table);
    EXECUTE format('DROP FUNCTION IF EXISTS core.observer_capture_%s()', p_table::oid);
    DELETE FROM core.observer_capture WHERE table_name = p_table;
    PERFORM core.observer_capture_forget_dropped();
END
$function$;

COMMENT ON FUNCTION core.observer_disable_capture(regclass) IS
    'fraiseql-observers: stop capturing a table (drops its triggers and generated function; no-op when not captured).';
