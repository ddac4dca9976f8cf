-- Create jobs of one name with the same flags.
-- KEYS[1]: the namespace prefix; KEYS[2] (optional): the Celery queue's list, when the broker is
--   this Redis: each new job's message is pushed with its record.
-- ARGV: name, flags_json, process_timeout ('' = none), tombstone (0/1), delay_seconds,
--   park (1 = wait in `delayed` for a promoter), then id, data_json pairs (with KEYS[2]:
--   id, data_json, message triples).
-- Returns the creation time.
return create_jobs(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1', 7, KEYS[2])
