from kickq_celery.testing import wait_for


def test_job_runs_on_in_process_worker(kickq, kickq_worker):
    @kickq.process("double")
    def double(job):
        return job.data * 2

    kickq_worker()
    job = kickq.create("double", 21, tombstone=True)
    assert job.promise.wait().result == 42
    assert kickq.get(job.id).state == "success"


def test_job_runs_on_celery_worker_process(kickq, worker_process):
    worker_process(concurrency=1)
    job = kickq.create("record", {"a": [1, 2]})
    record = wait_for(lambda: kickq.get(job.id).state == "success" and kickq.get(job.id), 20)
    assert record.result == {"a": [1, 2]}
