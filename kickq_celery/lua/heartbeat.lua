-- Renew the heartbeat locks of runs this process holds; never past the process_timeout cap.
-- KEYS[1]: the namespace prefix. ARGV: lock_timeout, then id, token pairs.
-- Returns {id, 'lost' | 'deleted' | 'terminate'} for each run no longer held (reaped, ended) or
--   whose job was deleted meanwhile (with terminate: its run is to be stopped).
local t = now()
local out = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local f = redis.call('HMGET', P .. 'job:' .. id, 'token', 'deadline_cap', 'deleted', 'terminate')
  if f[1] == ARGV[i + 1] then
    local deadline = t + tonumber(ARGV[1])
    if f[2] and f[2] ~= '' then deadline = math.min(deadline, tonumber(f[2])) end
    redis.call('ZADD', P .. 'active', 'XX', deadline, id)
    if f[3] == '1' then out[#out + 1] = {id, f[4] == '1' and 'terminate' or 'deleted'} end
  else
    out[#out + 1] = {id, 'lost'}
  end
end
return out
