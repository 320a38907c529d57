-- sessions.input_tokens / output_tokens are the sums of each session's token_usage rows: the
-- transaction that writes usage rows sets them (storage/writes.py, _sum_session_tokens). Rows
-- from before that were left at 0, since nothing wrote them; this brings them up to date.
-- A sum, not an increment: running it twice changes nothing.

update sessions s
   set input_tokens = u.input_tokens, output_tokens = u.output_tokens
  from (select session_id,
               sum(input_tokens)::bigint  as input_tokens,
               sum(output_tokens)::bigint as output_tokens
          from token_usage
         where session_id is not null
         group by session_id) u
 where s.session_id = u.session_id
   and (s.input_tokens, s.output_tokens) is distinct from (u.input_tokens, u.output_tokens);
