-- Drop the leases of jobs whose message was published (unless re-parked since).
-- KEYS[1]: the namespace prefix. ARGV: id, lease_until pairs.
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', P .. 'delayed', ARGV[i])
  if score and math.abs(tonumber(score) - tonumber(ARGV[i + 1])) < 0.001 then
    redis.call('ZREM', P .. 'delayed', ARGV[i])
  end
end
return 1
