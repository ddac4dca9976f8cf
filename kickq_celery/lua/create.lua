-- Create jobs of one name with the same flags.
-- ARGV: prefix, name, flags_json, process_timeout ('' = none), tombstone (0/1),
--       delay_seconds, park (1 = wait in `delayed` for a promoter), then id, data_json pairs.
-- Returns the creation time.
local name, flags, ptimeout, tombstone = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local delay, park = tonumber(ARGV[6]), ARGV[7] == '1'
local t, ts = now()
local due = delay > 0 and fmt(t + delay) or ts
local state = 'queued'
if delay > 0 then state = 'delayed' end
local extra = {}
if ptimeout ~= '' then extra = {'ptimeout', ptimeout} end
if tombstone == '1' then table.insert(extra, 'tombstone'); table.insert(extra, '1') end
local n = 0
for i = 8, #ARGV, 2 do
  local id = ARGV[i]
  -- an id that exists is this call again (redis-py re-sends a command whose reply a dropped
  -- connection lost): writing it twice would reset a job a worker may have started
  if redis.call('EXISTS', P .. 'job:' .. id) == 0 then
    -- only what is known now: readers take a missing field as empty, zero or false
    redis.call('HSET', P .. 'job:' .. id, 'id', id, 'name', name, 'state', state,
      'data', ARGV[i + 1], 'flags', flags, 'created_at', ts, 'scheduled_for', due,
      'attempt', '1', 'runs', '[]', unpack(extra))
    redis.call('ZADD', P .. 'idx:' .. state, due, id)
    if park then redis.call('ZADD', P .. 'delayed', due, id) end
    n = n + 1
  end
end
redis.call('HINCRBY', P .. 'stats:' .. name, state, n)
redis.call('HINCRBY', P .. 'stats:' .. name, 'created', n)
redis.call('SADD', P .. 'names', name)
return ts
