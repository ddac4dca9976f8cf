-- Shared helpers, prepended to every script.
-- ARGV[1] is always the namespace key prefix "{ns}:"; every key is built from it,
-- so all keys of a namespace share one Redis Cluster slot (the hash tag).
-- Times come from Redis TIME so that every machine agrees on the clock.
local P = ARGV[1]

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local WAITING = {queued = true, delayed = true, retry = true, ghost = true}
local GAUGE = {queued = true, delayed = true, retry = true, ghost = true, processing = true}

-- Move a job between state indexes and gauges; old or new may be false. Running jobs
-- are indexed by `active` alone (their heartbeat deadlines), not by an idx: set.
local function move(id, name, old, new, score)
  if old then
    if old ~= 'processing' then redis.call('ZREM', P .. 'idx:' .. old, id) end
    if GAUGE[old] then redis.call('HINCRBY', P .. 'stats:' .. name, old, -1) end
  end
  if new then
    if new ~= 'processing' then redis.call('ZADD', P .. 'idx:' .. new, score, id) end
    if GAUGE[new] then redis.call('HINCRBY', P .. 'stats:' .. name, new, 1) end
  end
end

-- Keep a bounded sample for the percentiles of the stats.
local function sample(key, value)
  if redis.call('LPUSH', key, value) > 500 then redis.call('LTRIM', key, 0, 499) end
end

-- A slot of `name` was freed: park the oldest job waiting for one as due now,
-- so that this worker (or any promoter, should it die) publishes it.
local function release(name, t)
  local key = P .. 'waiting:' .. name
  local id = redis.call('ZRANGE', key, 0, 0)[1]
  if id then
    redis.call('ZREM', key, id)
    redis.call('ZADD', P .. 'delayed', t, id)
    return id
  end
  return false
end

-- Count one completion in per-minute buckets (field: minute number, for the last hour)
-- and per-second buckets (field: 's' .. second, so the last minute is exact);
-- drop expired buckets once there are clearly more than the 61 + 60 in use.
-- Returns true for the first completion in this second (when housekeeping is due).
local function completed(name, t)
  local key = P .. 'done:' .. name
  local minute, second = math.floor(t / 60), math.floor(t)
  redis.call('HINCRBY', key, minute, 1)
  if redis.call('HINCRBY', key, 's' .. second, 1) > 1 then return false end
  if redis.call('HLEN', key) > 160 then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if string.sub(f, 1, 1) == 's' then
        if tonumber(string.sub(f, 2)) <= second - 60 then redis.call('HDEL', key, f) end
      elseif tonumber(f) < minute - 60 then
        redis.call('HDEL', key, f)
      end
    end
  end
  return true
end

-- End the current run of job `id` with outcome success | fail | ghost and decide
-- what follows: a retry or ghost re-run (parked in `delayed`), or the final state.
-- `token`, when given, must be the run's (else nil: the run was reaped, or the job is gone).
-- Returns {verdict, released_id, due_in, tombstone, attempt, last_error}.
local function end_run(id, outcome, payload, t, purge, token)
  local key = P .. 'job:' .. id
  local f = redis.call('HMGET', key, 'name', 'flags', 'runs', 'started_at', 'fails',
    'ghosts', 'deleted', 'total_process_time', 'attempt', 'tombstone', 'token')
  if token and f[11] ~= token then return nil end
  local name, flags, runs = f[1], cjson.decode(f[2]), cjson.decode(f[3])
  local duration = math.max(0, t - tonumber(f[4]))
  local run = {number = #runs + 1, started_at = tonumber(f[4]), duration = duration, state = outcome}
  if outcome ~= 'success' then run.error = payload end
  runs[#runs + 1] = run
  redis.call('ZREM', P .. 'active', id)
  local released = false
  if redis.call('SREM', P .. 'running:' .. name, id) == 1 then released = release(name, t) end
  if f[7] == '1' then
    -- deleted while running: the record goes now that the run is over
    move(id, name, 'processing', false)
    redis.call('DEL', key)
    return {'deleted', released, '0', f[10], f[9], ''}
  end
  sample(P .. 'ptimes:' .. name, duration)
  local stats = P .. 'stats:' .. name
  local verdict, due = outcome, nil
  local fails, ghosts = tonumber(f[5] or 0), tonumber(f[6] or 0)
  if outcome == 'fail' then
    fails = fails + 1
    if flags.retry and fails <= flags.retry_count then
      local interval = flags.retry_interval
      if type(interval) == 'table' then interval = interval[math.min(fails, #interval)] end
      verdict, due = 'retry', t + interval
      redis.call('HINCRBY', stats, 'retried', 1)
    end
  elseif outcome == 'ghost' then
    ghosts = ghosts + 1
    redis.call('HINCRBY', stats, 'ghosts', 1)
    if flags.ghost_retry and ghosts <= flags.ghost_times then
      due = t + flags.ghost_interval
    else
      verdict = 'fail'
    end
  end
  local last_error = ''
  local fields = {'runs', cjson.encode(runs), 'updated_at', t, 'fails', fails, 'ghosts', ghosts,
    'total_process_time', tonumber(f[8] or 0) + duration, 'token', ''}
  local function add(...)
    for _, v in ipairs({...}) do fields[#fields + 1] = v end
  end
  if outcome ~= 'success' then
    last_error = payload
    add('last_error', payload)
  end
  local reply
  if due then
    local attempt = tonumber(f[9]) + 1
    add('state', verdict, 'scheduled_for', due, 'attempt', attempt)
    reply = {verdict, released, tostring(due - t), f[10], tostring(attempt), last_error}
  else
    add('state', verdict, 'complete', 1, 'finished_at', t, 'success', verdict == 'success' and 1 or 0)
    if outcome == 'success' then add('result', payload) end
    reply = {verdict, released, '0', f[10], f[9], last_error}
  end
  -- kept so that the same finish sent again gets the same answer (see finish.lua)
  if token then add('ended_token', token, 'ended', cjson.encode(reply)) end
  redis.call('HSET', key, unpack(fields))
  if due then
    redis.call('ZADD', P .. 'delayed', due, id)
    move(id, name, 'processing', verdict, due)
    return reply
  end
  -- final: success or fail
  redis.call('HINCRBY', stats, verdict == 'success' and 'succeeded' or 'failed', 1)
  local housekeeping = completed(name, t)
  local expiry = '+inf'
  if purge > 0 then
    redis.call('PEXPIRE', key, math.floor(purge * 1000))
    expiry = t + purge
  end
  move(id, name, 'processing', verdict, expiry)
  -- drop index entries of purged records (once a second is enough)
  if housekeeping then redis.call('ZREMRANGEBYSCORE', P .. 'idx:' .. verdict, '-inf', t) end
  return reply
end
