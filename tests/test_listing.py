"""`jobs()` pages: read by rank, whole states skipped by their counts (O(log N + page) at any
offset without a name filter), each page the matching slice of the whole listing."""

from __future__ import annotations

import time


def test_pages_at_any_offset_are_slices_of_the_whole_listing(kickq):
    queued = [job.id for job in kickq.create_many("paged", range(7))]
    delayed = [job.id for job in kickq.create_many("paged", range(4), delay=600)]
    done = [job.id for job in kickq.create_many("paged", range(5))]
    for i, job_id in enumerate(done):  # three kept, two whose records expire in 0.3 s
        assert kickq.store.start_run(job_id, 1, "t", 30).status == "run"
        kickq.store.finish_run(job_id, "t", "success", str(i), 60 if i < 3 else 0.3)
    time.sleep(0.5)

    whole = [record.id for record in kickq.jobs(limit=100)]
    # in state order (queued, delayed, ..., success), the expired records left out, none twice
    assert len(whole) == len(set(whole)) == 7 + 4 + 3
    assert set(whole[:7]) == set(queued) and set(whole[7:11]) == set(delayed)
    assert whole[11:] == done[:3]  # finished ones by expiry
    for offset in range(len(whole) + 2):
        for size in (1, 3, 5):
            assert [r.id for r in kickq.jobs(offset=offset, limit=size)] == whole[offset:offset + size]
    assert [r.id for r in kickq.jobs(state="success", offset=1, limit=5)] == done[1:3]
    assert [r.id for r in kickq.jobs(state="delayed", name="paged", offset=3)] == whole[10:11]


def test_a_name_filter_reads_that_name_index_through_every_state(kickq):
    """`jobs(name=)` pages the name's own index: the same slices as the whole listing filtered,
    names that share a prefix or hold ':' kept apart, a job followed through running, retry,
    success, delete and the expiry of its record."""
    ours = [job.id for job in kickq.create_many("a:b", range(6))]
    kickq.create_many("a", range(5))  # ("a" + ":b..." must not read as "a:b")
    kickq.create_many("a:b:c", range(3))
    rare = kickq.create("rare:name", 1).id
    whole = [r.id for r in kickq.jobs(limit=100) if r.name == "a:b"]
    assert set(whole) == set(ours)
    for offset in range(8):
        for size in (1, 4):
            assert [r.id for r in kickq.jobs(name="a:b", offset=offset, limit=size)] == \
                whole[offset:offset + size]
    assert [r.id for r in kickq.jobs(name="rare:name")] == [rare]
    assert kickq.jobs(name="nobody") == []

    store = kickq.store
    running, failing, done, gone = whole[:4]
    for job_id in (running, failing, done):
        assert store.start_run(job_id, 1, "t", 30).status == "run"
    assert [r.id for r in kickq.jobs(state="processing", name="a:b")] == [running, failing, done]
    store.finish_run(failing, "t", "fail", "ValueError: no", 60)  # no retry: failed for good
    store.finish_run(done, "t", "success", "1", 0.3)  # its record expires in 0.3 s
    kickq.delete(gone)
    assert [r.id for r in kickq.jobs(state="processing", name="a:b")] == [running]
    assert [r.id for r in kickq.jobs(state="fail", name="a:b")] == [failing]
    assert [r.id for r in kickq.jobs(state="success", name="a:b")] == [done]
    time.sleep(0.5)
    assert kickq.jobs(state="success", name="a:b") == []
    waiting = whole[4:]
    assert [r.id for r in kickq.jobs(state="queued", name="a:b")] == waiting
    assert [r.id for r in kickq.jobs(name="a:b")] == [*waiting, running, failing]
