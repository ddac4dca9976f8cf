-- The run guard: start a run of job `id` if its message is current and its name's limits allow:
-- a max_jobs_num slot, a run of its concurrency key (max_jobs_per_key) and a start in the
-- rate_limit window. A job held by a limit waits in Redis (waiting:<name> for a slot or the
-- window, keywait:... for its key) in priority order, for the end of a run or the window's
-- opening to release it (see release() in lib.lua and promote.lua).
-- KEYS[1]: the namespace prefix. ARGV: id, attempt (from the message), token, lock_timeout
-- Returns {'run', data, runs, created_at, started_at, process_timeout ('' = none)} | {'gone'}
--   | {'skip', state} | {'wait'} | {'early', seconds_until_due}
return start_run(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
