-- Renew the heartbeat locks of runs this process holds; never past the process_timeout cap.
-- KEYS[1]: the namespace prefix. ARGV: lock_timeout, then id, token pairs.
-- Returns the ids whose run is no longer held (reaped or deleted).
local t = now()
local lost = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local f = redis.call('HMGET', P .. 'job:' .. id, 'token', 'deadline_cap')
  if f[1] == ARGV[i + 1] then
    local deadline = t + tonumber(ARGV[1])
    if f[2] and f[2] ~= '' then deadline = math.min(deadline, tonumber(f[2])) end
    redis.call('ZADD', P .. 'active', 'XX', deadline, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
