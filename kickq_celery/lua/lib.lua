-- Shared helpers, prepended to every script.
-- KEYS[1] is always the namespace key prefix "{ns}:"; every key is built from it, so all
-- keys of a namespace share one Redis Cluster slot (the hash tag), and declaring it routes
-- the call to that slot's node.
-- Times come from Redis TIME so that every machine agrees on the clock.
-- Numbers are passed to redis.call as strings where it is cheap to: Redis formats a
-- Lua number argument with snprintf("%.17g"), a large part of a script's cost.
local P = KEYS[1]

-- Scripts that are not idempotent by themselves take a call id as ARGV[1]: redis-py re-sends
-- a command whose reply a dropped connection lost, and the call sent again must change
-- nothing and get the first call's reply. `replayed()` is that reply (or nil);
-- `remember(reply)` keeps it for two minutes (re-sends come within seconds) and returns it.
-- Calls that changed nothing need not remember: sent again, they are a new call.
local function replayed()
  local seen = redis.call('GET', P .. 'call:' .. ARGV[1])
  if seen then return cjson.decode(seen) end
  return nil
end

local function remember(reply)
  redis.call('SET', P .. 'call:' .. ARGV[1], cjson.encode(reply), 'EX', '120')
  return reply
end

-- Redis TIME as a number, and as exact text (seconds with microseconds) to store.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000, t[1] .. '.' .. string.rep('0', 6 - #t[2]) .. t[2]
end

-- Seconds (a duration or a time) as text with microseconds, cheaper than "%.17g".
local function fmt(seconds)
  return string.format('%.6f', seconds)
end

-- (functions rather than lookup tables: building tables on every call costs more)
local function waiting(state)
  return state == 'queued' or state == 'delayed' or state == 'retry' or state == 'ghost'
end

-- The index of the jobs of `name` in `state`, scored as idx:<state> is (running jobs by their
-- start): a listing of one name reads it (the length prefix keeps a name with ':' apart).
local function name_index(state, name)
  return P .. 'nidx:' .. state .. ':' .. #name .. ':' .. name
end

-- Move a job between state indexes; old or new may be false. Running jobs are indexed by
-- `active` (their heartbeat deadlines), not by an idx: set, and by their name's. (The stats'
-- gauges of a name, queued to processing, are the sizes of its name indexes: no counter to keep.)
local function move(id, name, old, new, score)
  if old then
    if old ~= 'processing' then redis.call('ZREM', P .. 'idx:' .. old, id) end
    redis.call('ZREM', name_index(old, name), id)
  end
  if new then
    if new ~= 'processing' then redis.call('ZADD', P .. 'idx:' .. new, score, id) end
    redis.call('ZADD', name_index(new, name), score, id)
  end
end

-- Keep a bounded sample for the percentiles of the stats (the latest 500; trimmed once
-- every 100 pushes, not on each one).
local function sample(key, value)
  if redis.call('LPUSH', key, value) > 600 then redis.call('LTRIM', key, '0', '499') end
end

-- Wake one sleeping promoter for something due at `due` (text) before everything parked so far
-- (they sleep until the earliest due time: see worker/bootstep.py).
local function wake_for(due)
  local first = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')[2]
  if not first or tonumber(due) < tonumber(first) then
    redis.call('LPUSH', P .. 'wake', due)
    redis.call('LTRIM', P .. 'wake', '0', '0')
  end
end

-- Park job `id` in `delayed` until `due` (text) for a promoter to publish.
local function park(id, due)
  wake_for(due)
  redis.call('ZADD', P .. 'delayed', due, id)
end

-- Create jobs of one name with the same flags, from ARGV[first] on as id, data_json pairs, or
-- with `queue` (the Celery queue's list on this same Redis, a broker) as groups of a count, that
-- many id, data_json pairs and the message that wakes them: a message is pushed with its records
-- (when one of its jobs is new), so no record exists without its message. A job is parked when
-- `parked` (delayed past the horizon, or a cron tick's job).
-- `priority` ('0'-'9') and `ckey` (the concurrency key, '' = none) are kept on the record.
-- An id that exists is not written again: its job is answered as {id, state, created_at, data,
-- name} (asked for with tombstone, it is tombstoned from now on unless it ended already).
-- `forget` (a caller's own ids on a result backend in this Redis: its key prefix) drops the
-- outcome an earlier job of a reused id left, so the new job's waiters do not get it.
-- Returns {creation time (text), existing jobs}.
local function create_jobs(name, flags, ptimeout, tombstone, delay, parked, priority, ckey, first, queue,
    forget)
  local t, ts = now()
  local due = delay > 0 and fmt(t + delay) or ts
  local state = 'queued'
  if delay > 0 then state = 'delayed' end
  local extra = {}
  if ptimeout ~= '' then extra = {'ptimeout', ptimeout} end
  if tombstone == '1' then table.insert(extra, 'tombstone'); table.insert(extra, '1') end
  if priority ~= '0' then table.insert(extra, 'priority'); table.insert(extra, priority) end
  if ckey ~= '' then table.insert(extra, 'ckey'); table.insert(extra, ckey) end
  if flags ~= '' then table.insert(extra, 'flags'); table.insert(extra, flags) end
  if delay > 0 then table.insert(extra, 'scheduled_for'); table.insert(extra, due) end
  local n = 0
  local existing = {}
  -- writes job `id` unless it exists; whether it wrote
  local function write(id, data)
    local key = P .. 'job:' .. id
    -- an id that exists is a caller's job_id used again, or this call again (redis-py re-sends
    -- a command whose reply a dropped connection lost): writing it twice would reset a job a
    -- worker may have started
    local old = redis.call('HMGET', key, 'state', 'created_at', 'data', 'name')
    if not old[1] then
      if forget and forget ~= '' then redis.call('DEL', forget .. id) end
      -- only what is known now: readers take a missing field as empty, zero or false
      -- (the id is the key's; no runs yet; a job due at once is scheduled for its creation)
      redis.call('HSET', key, 'name', name, 'state', state, 'data', data, 'created_at', ts,
        'attempt', '1', unpack(extra))
      redis.call('ZADD', P .. 'idx:' .. state, due, id)
      redis.call('ZADD', name_index(state, name), due, id)
      if parked then park(id, due) end
      n = n + 1
      return true
    end
    if tombstone == '1' and old[1] ~= 'success' and old[1] ~= 'fail' then
      redis.call('HSET', key, 'tombstone', '1')
    end
    existing[#existing + 1] = {id, old[1], old[2], old[3], old[4]}
    return false
  end
  if queue then
    local i = first
    while i <= #ARGV do
      local count, wrote = tonumber(ARGV[i]), false
      for j = i + 1, i + 2 * count, 2 do
        if write(ARGV[j], ARGV[j + 1]) then wrote = true end
      end
      if wrote then redis.call('LPUSH', queue, ARGV[i + 2 * count + 1]) end
      i = i + 2 * count + 2
    end
  else
    for i = first, #ARGV, 2 do write(ARGV[i], ARGV[i + 1]) end
  end
  redis.call('HINCRBY', P .. 'stats:' .. name, 'created', n)
  redis.call('SADD', P .. 'names', name)
  return {ts, existing}
end

-- The flags of a record: its JSON keeps those that differ from their defaults (none: no field),
-- FLAG_DEFAULTS is their JSON (from options.py, put before this file by scripts.py).
local function flags_of(json)
  local flags = json and cjson.decode(json) or {}
  for name, value in pairs(cjson.decode(FLAG_DEFAULTS)) do
    if flags[name] == nil then flags[name] = value end
  end
  return flags
end

-- The limits of job `name` (see limit.lua: "max|rate_n|rate_window|per_key", any part empty),
-- or nil: max_jobs_num, rate_limit as n starts per window seconds, max_jobs_per_key.
local function limits_of(name)
  local v = redis.call('HGET', P .. 'limits', name)
  if not v then return nil end
  local max, rate_n, rate_w, per_key = string.match(v, '^([^|]*)|?([^|]*)|?([^|]*)|?([^|]*)$')
  return {max = tonumber(max), rate_n = tonumber(rate_n), rate_w = tonumber(rate_w),
    per_key = tonumber(per_key)}
end

-- The keys of one concurrency key of a name: its runs, and its jobs waiting for one to end
-- (the length prefix keeps name "a:b" key "c" apart from name "a" key "b:c").
local function keyed(name, ckey)
  local k = #name .. ':' .. name .. ':' .. ckey
  return P .. 'keyrun:' .. k, P .. 'keywait:' .. k
end

-- The order of waiting jobs: higher priority first, then the earlier `since` (a time).
local function wait_score(priority, since)
  return fmt((9 - tonumber(priority or '0')) * 1e10 + tonumber(since))
end

-- How many more runs of a rate-limited name may start now (its window's old starts dropped).
local function rate_room(name, limits, t)
  local starts = P .. 'starts:' .. name
  redis.call('ZREMRANGEBYSCORE', starts, '-inf', fmt(t - limits.rate_w))
  return limits.rate_n - redis.call('ZCARD', starts)
end

-- Jobs of a rate-limited name wait for its window: a promoter wakes them when it next opens
-- (when the oldest start in it leaves; with none, a window from now: the jobs just released
-- start no sooner). Opening early only turns a job away again, which arms this again.
local function arm_rate(name, limits, t)
  local oldest = redis.call('ZRANGE', P .. 'starts:' .. name, 0, 0, 'WITHSCORES')[2]
  local opens = fmt((oldest and tonumber(oldest) or t) + limits.rate_w)
  redis.call('ZADD', P .. 'ratewake', 'LT', opens, name)
  wake_for(opens)
end

-- Park the first job of waiting set `key` (highest priority, then the earliest to come) as due
-- now, so that this worker (or any promoter, should it die) publishes it; returns its id.
local function wake_first(key, t)
  local id = redis.call('ZRANGE', key, 0, 0)[1]
  if not id then return false end
  redis.call('ZREM', key, id)
  redis.call('ZADD', P .. 'delayed', t, id)
  return id
end

-- A slot of `name` was freed (or its rate window opened): wake the first job waiting for it.
local function release(name, t)
  return wake_first(P .. 'waiting:' .. name, t)
end

-- A run of concurrency key `ckey` of `name` ended: wake the first job waiting for that key.
local function release_key(name, ckey, t)
  local _, wait = keyed(name, ckey)
  local id = wake_first(wait, t)
  if redis.call('EXISTS', wait) == 0 then redis.call('SREM', P .. 'keyed:' .. name, ckey) end
  return id
end

-- Drop up to `limit` entries of purged records from a finished state's index, or that of
-- `name` (their scores are the records' expiry times): a bounded step, so no call holds Redis long.
local function trim_index(state, ts, limit, name)
  local key = name and name_index(state, name) or P .. 'idx:' .. state
  local stale = redis.call('ZRANGEBYSCORE', key, '-inf', ts, 'LIMIT', 0, limit)
  if #stale > 0 then redis.call('ZREM', key, unpack(stale)) end
  return #stale
end

-- Count one completion in per-second buckets (field: 's' .. second, so the last minute is exact)
-- and per-minute ones (field: minute number, for the last hour). A second's count goes into its
-- minute when the next second with a completion comes (field 'last' names the second not yet
-- added: readers add it), so a completion costs one call; drop expired buckets once there are
-- clearly more than the 61 + 60 in use.
-- Returns how many completions of the name this second has counted (1: housekeeping is due).
local function completed(name, t, ts)
  local key = P .. 'done:' .. name
  local minute, second = math.floor(t / 60), string.match(ts, '^%d+')
  local count = redis.call('HINCRBY', key, 's' .. second, '1')
  if count > 1 then return count end
  local last = redis.call('HGET', key, 'last')
  local n = last and redis.call('HGET', key, 's' .. last)
  if n then redis.call('HINCRBY', key, string.format('%d', math.floor(tonumber(last) / 60)), n) end
  redis.call('HSET', key, 'last', second)
  if redis.call('HLEN', key) > 160 then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if string.sub(f, 1, 1) == 's' then
        if tonumber(string.sub(f, 2)) <= tonumber(second) - 60 then redis.call('HDEL', key, f) end
      elseif f ~= 'last' and tonumber(f) < minute - 60 then
        redis.call('HDEL', key, f)
      end
    end
  end
  return count
end

-- Keep a run's process time (`took`, text), and the job's wait for its first run (`waited`, or nil),
-- in the samples of the stats' percentiles: every run while its name completes up to 10 jobs
-- in a second, then one in ten (`count`: the name's completions this second; 0 = not final).
local function sample_run(name, took, waited, count)
  if count > 10 and count % 10 ~= 0 then return end
  sample(P .. 'ptimes:' .. name, took)
  if waited then sample(P .. 'wtimes:' .. name, fmt(waited)) end
end

-- End the current run of job `id` with outcome success | fail | ghost and decide
-- what follows: a retry or ghost re-run (parked in `delayed`), or the final state.
-- `t, ts` are now() (number and text); `token`, when given, must be the running run's
-- (else nil: the run ended already, was reaped, or the job is gone).
-- Returns {verdict, released_id, due_in, tombstone, attempt, last_error[, terminated]}.
local function end_run(id, outcome, payload, t, ts, purge, token, tb)
  local key = P .. 'job:' .. id
  local f = redis.call('HMGET', key, 'name', 'state', 'runs', 'started_at', 'deleted',
    'total_process_time', 'attempt', 'tombstone', 'token', 'ckey', 'terminate', 'slot', 'created_at')
  if token and (f[9] ~= token or f[2] ~= 'processing') then return nil end
  local name = f[1]
  local duration = math.max(0, t - tonumber(f[4]))
  local took = fmt(duration)
  local earlier = (not f[3] or f[3] == '[]') and 0 or #cjson.decode(f[3])
  redis.call('ZREM', P .. 'active', id)
  local released = false
  -- (a run that took no max_jobs_num slot says so: see start_run)
  if f[12] ~= '0' and redis.call('SREM', P .. 'running:' .. name, id) == 1 then
    released = release(name, ts)
  end
  if f[10] and redis.call('SREM', (keyed(name, f[10])), id) == 1 then
    released = release_key(name, f[10], ts) or released
  end
  if f[5] == '1' then
    -- deleted while running: the record goes now that the run is over (the last item says
    -- whether the delete asked to stop the run: its outcome is then discarded)
    move(id, name, 'processing', false)
    redis.call('DEL', key)
    return {'deleted', released, '0', f[8], f[7], '', f[11] == '1' and '1' or '0'}
  end
  local waited = earlier == 0 and f[13] and tonumber(f[4]) - tonumber(f[13]) or nil
  local stats = P .. 'stats:' .. name
  local verdict, due = outcome, nil
  local fields = {'updated_at', ts, 'total_process_time', f[6] and fmt(tonumber(f[6]) + duration) or took}
  local function add(...)
    for _, v in ipairs({...}) do fields[#fields + 1] = v end
  end
  -- A job's one run, a success, is not written: readers take it from started_at and
  -- total_process_time (records.py). Its JSON would be the record's only value past 64 bytes,
  -- which turns the hash from a compact listpack into a hashtable (more memory, and a
  -- conversion on every finish).
  if earlier > 0 or outcome ~= 'success' then
    -- the run appended to the runs JSON as text: decoding and encoding the list costs more
    local run = '{"number":' .. tostring(earlier + 1) .. ',"started_at":' .. f[4] .. ',"duration":'
      .. took .. ',"state":"' .. outcome .. '"'
    if outcome ~= 'success' then run = run .. ',"error":' .. cjson.encode(payload) end
    if tb and tb ~= '' then run = run .. ',"traceback":' .. cjson.encode(tb) end
    add('runs', (earlier == 0 and '[' or string.sub(f[3], 1, -2) .. ',') .. run .. '}]')
  end
  -- a run that ends without its caller (reaped) drops the token: a late finish is stale
  if not token then add('token', '') end
  local failed = outcome ~= 'success' and redis.call('HMGET', key, 'flags', 'fails', 'ghosts')
  if outcome == 'fail' then
    local flags, fails = flags_of(failed[1]), tonumber(failed[2] or 0) + 1
    add('fails', fails)
    if flags.retry and fails <= flags.retry_count then
      local interval = flags.retry_interval
      if type(interval) == 'table' then interval = interval[math.min(fails, #interval)] end
      verdict, due = 'retry', t + interval
      redis.call('HINCRBY', stats, 'retried', '1')
    end
  elseif outcome == 'ghost' then
    local flags, ghosts = flags_of(failed[1]), tonumber(failed[3] or 0) + 1
    add('ghosts', ghosts)
    redis.call('HINCRBY', stats, 'ghosts', '1')
    if flags.ghost_retry and ghosts <= flags.ghost_times then
      due = t + flags.ghost_interval
    else
      verdict = 'fail'
    end
  end
  local last_error = ''
  if outcome ~= 'success' then
    last_error = payload
    add('last_error', payload)
  end
  local reply
  if due then
    local attempt = tostring(tonumber(f[7]) + 1)
    reply = {verdict, released, fmt(due - t), f[8], attempt, last_error}
    due = fmt(due)
    add('state', verdict, 'scheduled_for', due, 'attempt', attempt)
  else
    -- (complete and success follow from the state: see records.py)
    add('state', verdict, 'finished_at', ts)
    if outcome == 'success' then add('result', payload) end
    reply = {verdict, released, '0', f[8], f[7], last_error}
  end
  -- with the token kept, the same finish sent again gets the same answer (see finish.lua)
  if token then add('ended', cjson.encode(reply)) end
  redis.call('HSET', key, unpack(fields))
  if due then
    sample_run(name, took, waited, 0)
    park(id, due)
    move(id, name, 'processing', verdict, due)
    return reply
  end
  -- final: success or fail
  redis.call('HINCRBY', stats, verdict == 'success' and 'succeeded' or 'failed', '1')
  local count = completed(name, t, ts)
  sample_run(name, took, waited, count)
  local expiry = '+inf'
  if purge > 0 then
    redis.call('PEXPIRE', key, string.format('%d', purge * 1000))
    expiry = fmt(t + purge)
  end
  move(id, name, 'processing', verdict, expiry)
  -- drop index entries of purged records (once a second; the reaper does the rest)
  if count == 1 then
    trim_index(verdict, ts, 100)
    trim_index(verdict, ts, 100, name)
  end
  return reply
end

-- The run guard (see start.lua): start a run of job `id` at `attempt` with `token`, if it may;
-- `t, ts`: now() when the caller has it (else read here). (A job its chunk held ahead stays in
-- `ahead` until that hold expires: started, it is no longer a candidate of the sweep.)
local function start_run(id, attempt, token, lock_timeout, t, ts)
  local key = P .. 'job:' .. id
  local f = redis.call('HMGET', key, 'name', 'state', 'attempt', 'deleted', 'ptimeout',
    'created_at', 'started_at', 'scheduled_for', 'token', 'data', 'runs', 'priority', 'ckey')
  if not f[1] then return {'gone'} end
  -- our own call again (redis-py re-sends a command whose reply a dropped connection lost):
  -- the run that call started is ours
  if f[2] == 'processing' and f[9] == token then
    return {'run', f[10], f[11], f[6], f[7], f[5] or ''}
  end
  -- a message for a deleted, finished, running or superseded attempt is a duplicate
  if f[4] == '1' or f[3] ~= attempt or not waiting(f[2]) then return {'skip', f[2]} end
  local name = f[1]
  if not t then t, ts = now() end
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
      redis.call('ZADD', P .. 'starts:' .. name, ts, token)
    end
  end
  local deadline = t + tonumber(lock_timeout)
  local fields = {'state', 'processing', 'token', token, 'started_at', ts, 'updated_at', ts}
  if f[5] and f[5] ~= '' then
    local cap = t + tonumber(f[5])
    deadline = math.min(deadline, cap)
    fields[9], fields[10] = 'deadline_cap', fmt(cap)
  end
  -- slots are counted only for limited names (a limit set later counts runs from then on)
  local slot = '0'
  if limits and limits.max then
    redis.call('SADD', P .. 'running:' .. name, id)
    slot = '1'
  end
  fields[#fields + 1], fields[#fields + 2] = 'slot', slot
  redis.call('HSET', key, unpack(fields))
  redis.call('ZADD', P .. 'active', fmt(deadline), id)
  -- (a lease left in `delayed` by a promoter is dropped by it, or by the next promote pass)
  if limits then redis.call('ZREM', P .. 'waiting:' .. name, id) end
  if krun then
    redis.call('SADD', krun, id)
    redis.call('ZREM', kwait, id)
  end
  move(id, name, f[2], 'processing', ts)
  return {'run', f[10], f[11], f[6], ts, f[5] or ''}
end

-- End the run of job `id` that `token` holds (see finish.lua); `t, ts`: now(), or nil.
local function finish_run(id, token, outcome, payload, purge, tb, t, ts)
  local key = P .. 'job:' .. id
  if not t then t, ts = now() end
  local r = end_run(id, outcome, payload, t, ts, purge, token, tb)
  if not r then
    -- our own call again (redis-py re-sends a command whose reply a dropped connection lost):
    -- answer what that call did
    local f = redis.call('HMGET', key, 'token', 'state', 'ended')
    if f[1] == token and f[2] ~= 'processing' and f[3] then return cjson.decode(f[3]) end
    return {'stale'}
  end
  return r
end
