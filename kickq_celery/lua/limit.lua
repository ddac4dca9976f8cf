-- Set or clear the limits of a job name (a worker starting), and wake the jobs waiting for
-- what that frees (all of them when cleared): a raised or removed limit strands no one.
-- KEYS[1]: the namespace prefix. ARGV: call id, name, max_jobs_num, rate_n, rate_window,
--   max_jobs_per_key ('' = none, for each), cap
-- Returns how many waiting jobs were woken: at most cap (the caller calls again if it is reached).
local again = replayed()
if again then return again end
local name = ARGV[2]
-- (a max_jobs_num alone is stored as the bare number)
local value = ARGV[3]
if ARGV[4] .. ARGV[6] ~= '' then value = ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. ARGV[6] end
if value == '' then
  redis.call('HDEL', P .. 'limits', name)
else
  redis.call('HSET', P .. 'limits', name, value)
end
local limits = limits_of(name) or {}
local t = now()
local wake = redis.call('ZCARD', P .. 'waiting:' .. name)
if limits.max then wake = math.min(wake, limits.max - redis.call('SCARD', P .. 'running:' .. name)) end
if limits.rate_n then wake = math.min(wake, rate_room(name, limits, t)) end
local cap = tonumber(ARGV[7])
wake = math.min(wake, cap)
local woken = 0
for _ = 1, wake do
  if release(name, t) then woken = woken + 1 end
end
if limits.rate_n and redis.call('EXISTS', P .. 'waiting:' .. name) == 1 then arm_rate(name, limits, t) end
-- each concurrency key with waiting jobs: as many as its (new) limit lets run
for _, ckey in ipairs(redis.call('SMEMBERS', P .. 'keyed:' .. name)) do
  local krun, kwait = keyed(name, ckey)
  local n = redis.call('ZCARD', kwait)
  if limits.per_key then n = math.min(n, limits.per_key - redis.call('SCARD', krun)) end
  n = math.min(n, cap - woken)
  for _ = 1, n do
    if release_key(name, ckey, t) then woken = woken + 1 end
  end
  if n <= 0 and redis.call('EXISTS', kwait) == 0 then redis.call('SREM', P .. 'keyed:' .. name, ckey) end
end
return remember(woken)
