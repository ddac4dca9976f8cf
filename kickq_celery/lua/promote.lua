-- Wake the jobs of rate windows that opened, and claim parked jobs due within the horizon,
-- leasing each for `lease` seconds so that a promoter that dies before publishing is replaced
-- by another one.
-- KEYS[1]: the namespace prefix. ARGV: call id, horizon, lease, limit
-- Returns {claims, seconds until the next parked job is due ('' = none)}, each claim
--   {id, name, attempt, countdown, lease_until, process_timeout, the start of the data}.
local again = replayed()
if again then return again end
local t = now()
local out = {}
-- rate windows that opened: release as many of their name's waiting jobs as may start now
for _, name in ipairs(redis.call('ZRANGEBYSCORE', P .. 'ratewake', '-inf', t, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P .. 'ratewake', name)
  local waiting_jobs = redis.call('ZCARD', P .. 'waiting:' .. name)
  local limits = limits_of(name)
  local room = waiting_jobs
  if limits and limits.rate_n then room = math.min(room, rate_room(name, limits, t)) end
  local capped = room > tonumber(ARGV[4])
  if capped then room = tonumber(ARGV[4]) end
  for _ = 1, room do release(name, t) end
  if capped then
    redis.call('ZADD', P .. 'ratewake', t, name)  -- the rest at the next pass
  elseif limits and limits.rate_n and waiting_jobs > math.max(room, 0) then
    -- jobs still wait once the released ones fill the window: wake them when it next opens
    arm_rate(name, limits, t)
  end
end
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
    out[#out + 1] = {id, f[1], f[3], tostring(math.max(0, tonumber(f[4] or '0') - t)), tostring(lease), f[6],
      string.sub(f[7], 1, 101)}
  end
end
-- and how soon the next parked job is due (a promoter sleeps until then)
local first = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')[2]
local rate = redis.call('ZRANGE', P .. 'ratewake', 0, 0, 'WITHSCORES')[2]
if rate and (not first or tonumber(rate) < tonumber(first)) then first = rate end
local reply = {out, first and tostring(tonumber(first) - t) or ''}
if #out == 0 then return reply end
return remember(reply)
