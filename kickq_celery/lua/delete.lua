-- Delete a job for good. A running job keeps its record until its run ends; with terminate,
-- its worker stops the run (see heartbeat.lua).
-- KEYS[1]: the namespace prefix. ARGV: call id, id, terminate (0/1)
-- Returns {0} unknown | {1, tombstone, final} deleted | {2, tombstone, 0} marked (running)
local again = replayed()
if again then return again end
local id = ARGV[2]
local key = P .. 'job:' .. id
local f = redis.call('HMGET', key, 'name', 'state', 'deleted', 'tombstone', 'ckey')
if not f[1] or f[3] == '1' then return {0} end
local name, state = f[1], f[2]
local final = (state == 'success' or state == 'fail') and 1 or 0
if final == 0 then redis.call('HINCRBY', P .. 'stats:' .. name, 'deleted', 1) end
if state == 'processing' then
  redis.call('HSET', key, 'deleted', 1)
  if ARGV[3] == '1' then redis.call('HSET', key, 'terminate', 1) end
  return remember({2, f[4], 0})
end
move(id, name, state, false)
redis.call('DEL', key)
redis.call('ZREM', P .. 'delayed', id)
redis.call('ZREM', P .. 'waiting:' .. name, id)
if f[5] then
  local _, kwait = keyed(name, f[5])
  redis.call('ZREM', kwait, id)
end
-- it may have been woken for a freed slot: pass the slot on (a needless wake-up is harmless)
local limits = limits_of(name)
if limits and limits.max and redis.call('SCARD', P .. 'running:' .. name) < limits.max then
  release(name, now())
end
return remember({1, f[4], final})
