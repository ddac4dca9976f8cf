-- The run guard: start a run of job `id` if its message is current and its name's limits allow:
-- a max_jobs_num slot, a run of its concurrency key (max_jobs_per_key) and a start in the
-- rate_limit window. A job held by a limit waits in Redis (waiting:<name> for a slot or the
-- window, keywait:... for its key) in priority order, for the end of a run or the window's
-- opening to release it (see release() in lib.lua and promote.lua).
-- KEYS[1]: the namespace prefix. ARGV: id, attempt (from the message), token, lock_timeout
-- Returns {'run', data, runs, created_at, started_at, process_timeout ('' = none)} | {'gone'}
--   | {'skip', state} | {'wait'} | {'early', seconds_until_due}
local id = ARGV[1]
local key = P .. 'job:' .. id
local f = redis.call('HMGET', key, 'name', 'state', 'attempt', 'deleted', 'ptimeout',
  'created_at', 'started_at', 'scheduled_for', 'token', 'data', 'runs', 'priority', 'ckey')
if not f[1] then return {'gone'} end
-- our own call again (redis-py re-sends a command whose reply a dropped connection lost):
-- the run that call started is ours
if f[2] == 'processing' and f[9] == ARGV[3] then
  return {'run', f[10], f[11], f[6], f[7], f[5] or ''}
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
local limits = limits_of(name)
local krun, kwait
if limits then
  -- (in the order messages came: that is due order, as each goes out when its job is due)
  local score = wait_score(f[12], ts)
  if limits.max and redis.call('SCARD', P .. 'running:' .. name) >= limits.max then
    redis.call('ZADD', P .. 'waiting:' .. name, 'NX', score, id)
    return {'wait'}
  end
  if limits.per_key and f[13] then
    krun, kwait = keyed(name, f[13])
    if redis.call('SCARD', krun) >= limits.per_key then
      -- a run of this key is under way: its end releases the next of the key
      redis.call('ZADD', kwait, 'NX', score, id)
      redis.call('SADD', P .. 'keyed:' .. name, f[13])
      return {'wait'}
    end
  end
  if limits.rate_n then
    if rate_room(name, limits, t) <= 0 then
      redis.call('ZADD', P .. 'waiting:' .. name, 'NX', score, id)
      arm_rate(name, limits, t)
      return {'wait'}
    end
    redis.call('ZADD', P .. 'starts:' .. name, ts, ARGV[3])
  end
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
if limits and limits.max then redis.call('SADD', P .. 'running:' .. name, id) end
-- (a lease left in `delayed` by a promoter is dropped by it, or by the next promote pass)
if limits then redis.call('ZREM', P .. 'waiting:' .. name, id) end
if krun then
  redis.call('SADD', krun, id)
  redis.call('ZREM', kwait, id)
end
move(id, name, f[2], 'processing', ts)
redis.call('ZREM', P .. 'ahead', id)  -- (reached by its chunk)
return {'run', f[10], f[11], f[6], ts, f[5] or ''}
