-- Renew the heartbeat locks of runs this process holds; never past the process_timeout cap.
-- And hold the jobs its chunks are still to run in `ahead` for as long, so that the redelivery
-- sweep does not take them for lost messages (see overdue.lua).
-- KEYS[1]: the namespace prefix. ARGV: lock_timeout, n, n ids ahead, then id, token pairs.
-- Returns {id, 'lost' | 'deleted' | 'terminate'} for each run no longer held (reaped, ended) or
--   whose job was deleted meanwhile (with terminate: its run is to be stopped).
local t = now()
local out = {}
local ahead = tonumber(ARGV[2])
for i = 3, 2 + ahead do redis.call('ZADD', P .. 'ahead', fmt(t + tonumber(ARGV[1])), ARGV[i]) end
for i = 3 + ahead, #ARGV, 2 do
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
