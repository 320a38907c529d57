-- Finding threads (the `threads` tool's `query`, storage/thread_search.py): full-text search
-- over the prompts and answers of a thread with the `simple` configuration (lower-cased
-- words, no stemming, no stop words: CJK and every other script are kept as written).
--
-- An expression index, not a generated column: adding a stored column rewrites the whole
-- table under an ACCESS EXCLUSIVE lock; an index is built beside it. The expression must stay
-- identical to the query's (storage/thread_search.py) or the planner cannot use it:
--   * `left(content, 50000)`: a tsvector holds at most 1 MiB of lexemes and to_tsvector
--     raises beyond it, which would make a long message's insert fail; 50,000 characters stay
--     far below it whatever the text (the most measured: about 10.5 bytes per character);
--   * partial: file copies (tool_name 'file') are not searched, and not indexed.
--
-- Locking: migrations run in one transaction (storage/migrations.py), so CONCURRENTLY is not
-- possible here. The build holds a SHARE lock on `messages`: reads go on, inserts of new
-- messages (chat turns being stored) wait until it ends; to_tsvector reads about 2 million
-- characters a second per core, so an empty or small table takes nothing, 1 GB of messages
-- some minutes. On a large table, build the index by hand first, outside a transaction:
--   create index concurrently if not exists messages_search_idx on messages
--       using gin (to_tsvector('simple', left(content, 50000)))
--       where role in ('user', 'assistant') and tool_name is distinct from 'file';
-- and this migration then finds it and does nothing (`if not exists` goes by the name only:
-- keep the definition exactly this one).
create index if not exists messages_search_idx on messages
    using gin (to_tsvector('simple', left(content, 50000)))
    where role in ('user', 'assistant') and tool_name is distinct from 'file';
