-- End a run that the caller holds (its token still matches).
-- KEYS[1]: the namespace prefix. ARGV: id, token, outcome (success|fail|ghost), payload (result json
--   or error), purge_seconds (0 = keep), traceback ('' = none)
-- Returns end_run's reply, or {'stale'} when the run was reaped or the job is gone.
return finish_run(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6])
