-- Claim parked jobs due within the horizon, leasing each for `lease` seconds so that
-- a promoter that dies before publishing is replaced by another one.
-- KEYS[1]: the namespace prefix. ARGV: call id, horizon, lease, limit
-- Returns {claims, seconds until the next parked job is due ('' = none)}, each claim
--   {id, name, attempt, countdown, lease_until, process_timeout, the start of the data}.
local again = replayed()
if again then return again end
local t = now()
local out = {}
local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', t + tonumber(ARGV[2]),
  'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', P .. 'job:' .. id, 'name', 'state', 'attempt',
    'scheduled_for', 'deleted', 'ptimeout', 'data')
  if not f[1] or not waiting(f[2]) or f[5] == '1' then
    redis.call('ZREM', P .. 'delayed', id)
  else
    local lease = t + tonumber(ARGV[3])
    redis.call('ZADD', P .. 'delayed', lease, id)
    out[#out + 1] = {id, f[1], f[3], tostring(math.max(0, tonumber(f[4]) - t)), tostring(lease), f[6],
      string.sub(f[7], 1, 101)}
  end
end
-- and how soon the next parked job is due (a promoter sleeps until then)
local first = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')[2]
local reply = {out, first and tostring(tonumber(first) - t) or ''}
if #out == 0 then return reply end
return remember(reply)
