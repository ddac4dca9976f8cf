-- Set or clear the max_jobs_num of a job name (a worker starting), and wake the jobs waiting
-- for the slots that frees (all of them when cleared): a raised or removed limit strands no one.
-- KEYS[1]: the namespace prefix. ARGV: call id, name, limit ('' = no limit)
-- Returns how many waiting jobs were woken.
local again = replayed()
if again then return again end
local name, limit = ARGV[2], tonumber(ARGV[3])
if limit then
  redis.call('HSET', P .. 'limits', name, limit)
else
  redis.call('HDEL', P .. 'limits', name)
end
local wake = redis.call('ZCARD', P .. 'waiting:' .. name)
if limit then wake = math.min(wake, limit - redis.call('SCARD', P .. 'running:' .. name)) end
local t = now()
for _ = 1, wake do release(name, t) end
return remember(math.max(wake, 0))
