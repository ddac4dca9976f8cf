-- Claim parked jobs due within the horizon, leasing each for `lease` seconds so that
-- a promoter that dies before publishing is replaced by another one.
-- ARGV: prefix, horizon, lease, limit
-- Returns a list of {id, name, attempt, countdown, lease_until, process_timeout}.
local t = now()
local out = {}
local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', t + tonumber(ARGV[2]),
  'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', P .. 'job:' .. id, 'name', 'state', 'attempt',
    'scheduled_for', 'deleted', 'ptimeout')
  if not f[1] or not waiting(f[2]) or f[5] == '1' then
    redis.call('ZREM', P .. 'delayed', id)
  else
    local lease = t + tonumber(ARGV[3])
    redis.call('ZADD', P .. 'delayed', lease, id)
    out[#out + 1] = {id, f[1], f[3], tostring(math.max(0, tonumber(f[4]) - t)), tostring(lease), f[6]}
  end
end
return out
