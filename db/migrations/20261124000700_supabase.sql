-- The Supabase-only parts, applied only where Supabase's objects exist, so this file runs
-- unchanged on plain PostgreSQL 15-18 (where it does nothing) and on Supabase.
--
-- Without policies, row level security denies everything to anon and authenticated; the
-- runtime connects as the table owner or service_role, which bypass it. The policies below
-- only let a signed-in user read their own conversation threads.

do $$
declare
    tbl text;
begin
    -- Realtime: dashboards subscribe to session and task status changes. A publication
    -- declared FOR ALL TABLES already has them (and refuses ADD TABLE).
    if exists (select 1 from pg_publication
                where pubname = 'supabase_realtime' and not puballtables) then
        foreach tbl in array array['sessions', 'tasks'] loop
            if not exists (select 1 from pg_publication_tables
                            where pubname = 'supabase_realtime'
                              and schemaname = current_schema()
                              and tablename = tbl) then
                execute format('alter publication supabase_realtime add table %I.%I',
                               current_schema(), tbl);
            end if;
        end loop;
    end if;
end
$$;

do $$
begin
    if to_regprocedure('auth.uid()') is not null
       and exists (select 1 from pg_roles where rolname = 'authenticated') then
        if not exists (select 1 from pg_policies
                        where schemaname = current_schema() and tablename = 'threads'
                          and policyname = 'threads_select_own') then
            execute format(
                'create policy threads_select_own on %I.threads for select to authenticated '
                'using (owner_id = (select auth.uid()))', current_schema());
        end if;
        if not exists (select 1 from pg_policies
                        where schemaname = current_schema() and tablename = 'messages'
                          and policyname = 'messages_select_own') then
            execute format(
                'create policy messages_select_own on %I.messages for select to authenticated '
                'using (exists (select 1 from %I.threads t where t.id = thread_id '
                'and t.owner_id = (select auth.uid())))', current_schema(), current_schema());
        end if;
    end if;
end
$$;
