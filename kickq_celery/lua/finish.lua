-- End a run that the caller holds (its token still matches).
-- KEYS[1]: the namespace prefix. ARGV: id, token, outcome (success|fail|ghost), payload (result json
--   or error), purge_seconds (0 = keep), traceback ('' = none)
-- Returns end_run's reply, or {'stale'} when the run was reaped or the job is gone.
local id, token = ARGV[1], ARGV[2]
local key = P .. 'job:' .. id
local t, ts = now()
local r = end_run(id, ARGV[3], ARGV[4], t, ts, tonumber(ARGV[5]), token, ARGV[6])
if not r then
  -- our own call again (redis-py re-sends a command whose reply a dropped connection lost):
  -- answer what that call did
  local f = redis.call('HMGET', key, 'token', 'state', 'ended')
  if f[1] == token and f[2] ~= 'processing' and f[3] then return cjson.decode(f[3]) end
  return {'stale'}
end
return r
