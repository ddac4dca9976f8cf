-- Record a running job's progress, if the caller's run still holds it (not reaped, not deleted).
-- KEYS[1]: the namespace prefix. ARGV: id, token, value_json
-- Returns 1 when recorded, else 0.
local key = P .. 'job:' .. ARGV[1]
local f = redis.call('HMGET', key, 'token', 'state', 'deleted')
if f[1] ~= ARGV[2] or f[2] ~= 'processing' or f[3] == '1' then return 0 end
redis.call('HSET', key, 'progress', ARGV[3])
return 1
