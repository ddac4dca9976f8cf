-- Jobs whose Celery message may be lost: waiting and due for more than `grace` seconds,
-- neither parked for a promoter nor waiting for a limit (a slot, its key, the rate window), nor
-- ahead in a running chunk (held by its worker's heartbeat: see heartbeat.lua).
-- KEYS[1]: the namespace prefix. ARGV: grace, limit (per state)
-- Returns a list of {id, name, attempt, process_timeout, the start of the data (for the message)}.
local t = now()
local out = {}
redis.call('ZREMRANGEBYSCORE', P .. 'ahead', '-inf', fmt(t))
for _, state in ipairs({'queued', 'delayed', 'retry', 'ghost'}) do
  local ids = redis.call('ZRANGEBYSCORE', P .. 'idx:' .. state, '-inf', t - tonumber(ARGV[1]),
    'LIMIT', 0, tonumber(ARGV[2]))
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', P .. 'job:' .. id, 'name', 'attempt', 'ptimeout', 'data', 'ckey')
    if f[1] and not redis.call('ZSCORE', P .. 'delayed', id) and not redis.call('ZSCORE', P .. 'ahead', id)
        and not redis.call('ZSCORE', P .. 'waiting:' .. f[1], id)
        and not (f[5] and redis.call('ZSCORE', select(2, keyed(f[1], f[5])), id)) then
      out[#out + 1] = {id, f[1], f[2], f[3], string.sub(f[4], 1, 101)}
    end
  end
end
return out
