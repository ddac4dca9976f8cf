-- Create jobs of one name with the same flags.
-- KEYS[1]: the namespace prefix. ARGV: name, flags_json, process_timeout ('' = none), tombstone (0/1),
--       delay_seconds, park (1 = wait in `delayed` for a promoter), then id, data_json pairs.
-- Returns the creation time.
return create_jobs(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1', 7)
