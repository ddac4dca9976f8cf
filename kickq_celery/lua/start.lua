-- The run guard: start a run of job `id` if its message is current and a slot is free.
-- KEYS[1]: the namespace prefix. ARGV: id, attempt (from the message), token, lock_timeout
-- Returns {'run', data, runs, created_at, started_at} | {'gone'} | {'skip', state} | {'wait'}
--   | {'early', seconds_until_due}
local id = ARGV[1]
local key = P .. 'job:' .. id
local f = redis.call('HMGET', key, 'name', 'state', 'attempt', 'deleted', 'ptimeout',
  'created_at', 'started_at', 'scheduled_for', 'token', 'data', 'runs')
if not f[1] then return {'gone'} end
-- our own call again (redis-py re-sends a command whose reply a dropped connection lost):
-- the run that call started is ours
if f[2] == 'processing' and f[9] == ARGV[3] then
  return {'run', f[10], f[11], f[6], f[7]}
end
-- a message for a deleted, finished, running or superseded attempt is a duplicate
if f[4] == '1' or f[3] ~= ARGV[2] or not waiting(f[2]) then return {'skip', f[2]} end
local name = f[1]
local t, ts = now()
-- no run before the job is due: a message's ETA comes from its publisher's clock, read before
-- the record got its time (or on another machine). A moment early, the caller waits; far too
-- early, the job is parked for a promoter to publish again.
local due = f[8] and tonumber(f[8])
if due and due > t then
  if due - t > 1 then redis.call('ZADD', P .. 'delayed', f[8], id) end
  return {'early', tostring(due - t)}
end
local limit = redis.call('HGET', P .. 'limits', name)
if limit and redis.call('SCARD', P .. 'running:' .. name) >= tonumber(limit) then
  redis.call('ZADD', P .. 'waiting:' .. name, 'NX', ts, id)
  return {'wait'}
end
local deadline = t + tonumber(ARGV[4])
local fields = {'state', 'processing', 'token', ARGV[3], 'started_at', ts, 'updated_at', ts}
if f[5] and f[5] ~= '' then
  local cap = t + tonumber(f[5])
  deadline = math.min(deadline, cap)
  fields[9], fields[10] = 'deadline_cap', fmt(cap)
end
if not f[7] then sample(P .. 'wtimes:' .. name, fmt(t - tonumber(f[6]))) end
redis.call('HSET', key, unpack(fields))
redis.call('ZADD', P .. 'active', fmt(deadline), id)
-- slots are counted only for limited names (a limit set later counts runs from then on)
if limit then redis.call('SADD', P .. 'running:' .. name, id) end
-- (a lease left in `delayed` by a promoter is dropped by it, or by the next promote pass)
if limit then redis.call('ZREM', P .. 'waiting:' .. name, id) end
move(id, name, f[2], 'processing', ts)
return {'run', f[10], f[11], f[6], ts}
