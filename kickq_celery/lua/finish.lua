-- End a run that the caller holds (its token still matches).
-- ARGV: prefix, id, token, outcome (success|fail|ghost), payload (result json or error), purge_seconds (0 = keep)
-- Returns end_run's reply, or {'stale'} when the run was reaped or the job is gone.
local id = ARGV[2]
if redis.call('HGET', P .. 'job:' .. id, 'token') ~= ARGV[3] then return {'stale'} end
return end_run(id, ARGV[4], ARGV[5], now(), tonumber(ARGV[6]))
