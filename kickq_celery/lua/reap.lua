-- Turn runs whose heartbeat lock expired (dead worker, or process_timeout) into ghost runs,
-- and drop index entries of purged records (a bounded step at each pass of every reaper).
-- KEYS[1]: the namespace prefix. ARGV: call id, purge_seconds, limit
-- Returns a list of {id, end_run reply...}.
local again = replayed()
if again then return again end
local t, ts = now()
trim_index('success', ts, 200)
trim_index('fail', ts, 200)
-- and those of a few names (at random: each pass, every reaper)
for _, name in ipairs(redis.call('SRANDMEMBER', P .. 'names', 10)) do
  trim_index('success', ts, 50, name)
  trim_index('fail', ts, 50, name)
end
local out = {}
local ids = redis.call('ZRANGEBYSCORE', P .. 'active', '-inf', ts, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  if redis.call('EXISTS', P .. 'job:' .. id) == 1 then
    local r = end_run(id, 'ghost', 'heartbeat lock expired: the worker died or process_timeout passed',
      t, ts, tonumber(ARGV[2]))
    table.insert(r, 1, id)
    out[#out + 1] = r
  else
    redis.call('ZREM', P .. 'active', id)
  end
end
if #out == 0 then return out end
return remember(out)
