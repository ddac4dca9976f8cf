"""The worker side: the task of each job name and its run guard, the heartbeat of running
jobs, and the maintenance loops (promote, reap, redeliver, cron) of the worker step.

Nothing here is needed to create or read a job; the client imports it only to
register a handler and to add the worker step. Each function is handed the
``Kickq`` it serves and never imports the client.
"""
