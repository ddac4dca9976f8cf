-- Claim one cron tick, once across all workers: the tick must be newer than the last claimed.
-- ARGV: prefix, schedule_key, tick_timestamp
-- Returns 1 when this caller claimed the tick, else 0.
if redis.call('HEXISTS', P .. 'cron', ARGV[2]) == 0 then return 0 end
local last = tonumber(redis.call('HGET', P .. 'cron:last', ARGV[2]) or '0')
if tonumber(ARGV[3]) <= last then return 0 end
redis.call('HSET', P .. 'cron:last', ARGV[2], ARGV[3])
return 1
