-- Claim one cron tick, once across all workers, and create its job in the same call, so a
-- worker that dies after claiming loses nothing: the job is parked as due now, and any
-- promoter publishes it. The tick must be newer than the last one claimed.
-- KEYS[1]: the namespace prefix. ARGV: call id, schedule_key, tick_timestamp, then the job:
--       name, flags_json, process_timeout ('' = none), tombstone (0/1), priority, concurrency key
--       ('' = none), id, data_json.
-- Returns 1 when this caller claimed the tick (and created the job), else 0.
local again = replayed()
if again then return again end
if redis.call('HEXISTS', P .. 'cron', ARGV[2]) == 0 then return 0 end
local last = tonumber(redis.call('HGET', P .. 'cron:last', ARGV[2]) or '0')
if tonumber(ARGV[3]) <= last then return 0 end
redis.call('HSET', P .. 'cron:last', ARGV[2], ARGV[3])
create_jobs(ARGV[4], ARGV[5], ARGV[6], ARGV[7], 0, true, ARGV[8], ARGV[9], 10)
return remember(1)
