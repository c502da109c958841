-- The functions that capture changes and number them ran with the writing
-- session's search_path: a table of the session's own named like the
-- change log (a temporary one, which is searched first, or one in a schema
-- of the user's ahead of this one) took the changes, while positions were
-- still taken for them in `change_tx`: clients got empty positions in their
-- place, and no resync. They now resolve names in the schema they were made
-- in (the migrations'), then pg_catalog, and temporary objects last.
-- (`change_read` and `change_head` are left as they are: readers' queries
-- inline them, which a function setting its own search_path prevents.)
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['change_capture_insert()', 'change_capture_update()', 'change_capture_delete()',
                             'change_reserve(integer)', 'change_sequence()'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_catalog, pg_temp', f, current_schema());
    END LOOP;
END
$$;
