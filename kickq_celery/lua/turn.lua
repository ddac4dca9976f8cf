-- A chunk's jobs in turn: end the run of one job (as finish.lua) and start the next one's (as
-- start.lua) in one call. Sent again, each part answers as the first time (see both).
-- KEYS[1]: the namespace prefix. ARGV: finish's six (id, token, outcome, payload, purge_seconds,
--   traceback), then start's four (id, attempt, token, lock_timeout).
-- Returns {finish's reply, start's reply}.
local t, ts = now()
return {finish_run(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], t, ts),
  start_run(ARGV[7], ARGV[8], ARGV[9], ARGV[10], t, ts)}
