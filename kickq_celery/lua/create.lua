-- Create jobs of one name with the same flags.
-- KEYS[1]: the namespace prefix; KEYS[2] (optional): the Celery queue's list, when the broker is
--   this Redis: each new job's message is pushed with its record.
-- ARGV: call id ('' = none: the ids are fresh, so the call sent again finds them and changes
--   nothing), name, flags_json, process_timeout ('' = none), tombstone (0/1), delay_seconds,
--   park (1 = wait in `delayed` for a promoter), priority, concurrency key ('' = none), the
--   result key prefix of outcomes to forget for new records ('' = none), then id, data_json
--   pairs (with KEYS[2]: groups of a count, that many id, data_json pairs and their message).
-- Returns {the creation time, the jobs whose id existed: {id, state, created_at, data, name}}.
-- A caller's own ids take a call id: the call sent again answers as the first time did,
-- rather than find its own jobs existing.
if ARGV[1] ~= '' then
  local again = replayed()
  if again then return again end
end
local reply = create_jobs(ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1',
  ARGV[8], ARGV[9], 11, KEYS[2], ARGV[10])
if ARGV[1] ~= '' then return remember(reply) end
return reply
