-- The optional wake-up hint (correctness.md section 3). When enabled, every statement that inserts
-- into core.tb_entity_change_log sends pg_notify('fraiseql_observers', '') once (PostgreSQL folds
-- identical notifications of one transaction into one). The payload is empty: the hint says "look
-- now", polling stays the source of truth. Off by default, because a notifying commit takes a
-- cluster-wide lock that serializes writers.
--
-- Invariant: the hint is on exactly when the trigger observer_notify_hint exists on the change log.
-- A statement that inserts no row may still notify; a spurious hint costs one poll.

CREATE OR REPLACE FUNCTION core.observer_notify_hint()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM pg_catalog.pg_notify('fraiseql_observers', '');
    RETURN NULL;
END
$function$;

CREATE OR REPLACE FUNCTION core.observer_notify_enabled()
RETURNS boolean
LANGUAGE sql
STABLE
AS $function$
    SELECT EXISTS (
        SELECT 1 FROM pg_catalog.pg_trigger
         WHERE tgrelid = 'core.tb_entity_change_log'::regclass
           AND tgname = 'observer_notify_hint');
$function$;

CREATE OR REPLACE FUNCTION core.observer_set_notify(enabled boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    IF enabled THEN
        IF NOT core.observer_notify_enabled() THEN
            BEGIN
                CREATE TRIGGER observer_notify_hint
                    AFTER INSERT ON core.tb_entity_change_log
                    FOR EACH STATEMENT EXECUTE FUNCTION core.observer_notify_hint();
            EXCEPTION WHEN duplicate_object THEN
                NULL; -- enabled concurrently by another session: the outcome is the same
            END;
        END IF;
    ELSE
        DROP TRIGGER IF EXISTS observer_notify_hint ON core.tb_entity_change_log;
    END IF;
END
$function$;

COMMENT ON FUNCTION core.observer_set_notify(boolean) IS
    'fraiseql-observers: switch the NOTIFY fraiseql_observers wake-up hint on change-log inserts on or off.';
