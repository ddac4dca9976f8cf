"""kickq_celery behind a FastAPI app: create jobs, wait for them, read, delete, stats.

Run it from the repository root, with a Redis on $KICKQ_REDIS_URL (default
redis://127.0.0.1:6379/0) as Celery broker and for kickq's records, in the namespace
$KICKQ_NAMESPACE (default "fastapi_example")::

    uvicorn examples.fastapi_app:api                    # the HTTP API, on 127.0.0.1:8000
    celery -A examples.fastapi_app worker -l INFO       # a worker running the handlers below

    curl -X POST localhost:8000/jobs/resize -H 'content-type: application/json' \\
         -d '{"width": 640, "height": 480}'             # 202 {"id": ..., "state": "queued"}
    curl localhost:8000/jobs/<id>                       # the job's record
    curl -X POST 'localhost:8000/jobs/resize/wait?timeout=5' -H 'content-type: application/json' \\
         -d '{"width": 640, "height": 480}'             # 200 {..., "result": {"width": 320, ...}}
    curl -X DELETE localhost:8000/jobs/<id>             # 204, then 404
    curl localhost:8000/stats                           # counts per job name

Job data is the request's JSON body (``content-type: application/json``). Every view
uses kickq's asyncio API (``acreate``, ``aget``, ``adelete``, ``astats``, ``await
job.promise``): none blocks the event loop or holds a thread while it waits.

Status codes: 202 created; 200 a waited-for job succeeded; 502 it failed (the handler's
error text in ``error``); 410 it was deleted while waited for; 504 ``timeout`` seconds
passed first (the job itself is not cancelled); 400 bad job data or options; 404 no such
job; 503 kickq's Redis does not answer.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from celery import Celery
from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from kickq_celery import (
    InvalidJobData,
    InvalidJobOptions,
    JobDeleted,
    JobFailed,
    JobNotFound,
    Kickq,
    RedisUnavailable,
    TombstoneTimeout,
)

REDIS_URL = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("KICKQ_NAMESPACE", "fastapi_example")
#: the longest a request may wait for a job (``POST /jobs/{name}/wait?timeout=``)
MAX_WAIT = 60.0

app = Celery("fastapi_example", broker=REDIS_URL)
kq = Kickq(app, redis=REDIS_URL, redis_namespace=NAMESPACE)


# --- the handlers: `celery -A examples.fastapi_app worker` runs them ----------------


@kq.process("resize")
def resize(job):
    """Halve an image's size: ``{"width": 640, "height": 480}`` -> ``{"width": 320, ...}``."""
    return {"width": job.data["width"] // 2, "height": job.data["height"] // 2}


@kq.process("fail")
def fail(job):
    """Always fails (no retries by default): its error text reaches the waiting request."""
    raise RuntimeError(f"cannot process {job.data!r}")


# --- the HTTP API: `uvicorn examples.fastapi_app:api` ---------------------------------

api = FastAPI(title="kickq_celery FastAPI example")
JobData = Annotated[Any, Body(description="the job's data: any JSON value")]


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@api.exception_handler(InvalidJobData)
@api.exception_handler(InvalidJobOptions)
async def bad_job(request: Request, exc: Exception) -> JSONResponse:
    return error(400, str(exc))


@api.exception_handler(JobNotFound)
async def not_found(request: Request, exc: Exception) -> JSONResponse:
    return error(404, str(exc))


@api.exception_handler(RedisUnavailable)
async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    return error(503, str(exc))


@api.post("/jobs/{name}", status_code=202)
async def create_job(name: str, data: JobData = None, delay: float | None = None) -> dict[str, Any]:
    """Create a job; a worker runs it after the response (after ``delay`` seconds, if given)."""
    job = await kq.acreate(name, data, delay=delay)
    return {"id": job.id, "state": job.state}


@api.post("/jobs/{name}/wait", responses={502: {}, 504: {}, 410: {}})
async def create_job_and_wait(name: str, data: JobData = None, timeout: float = 5.0) -> Any:
    """Create a tombstoned job and answer with its outcome, waiting at most ``timeout`` s."""
    if timeout > MAX_WAIT:
        return error(400, f"timeout: at most {MAX_WAIT:g} seconds")
    job = await kq.acreate(name, data, tombstone=True, tombstone_timeout=timeout)
    try:
        response = await job.promise
    except TombstoneTimeout as exc:  # the job goes on; GET /jobs/{id} tells how it ends
        return error(504, str(exc), id=job.id)
    except JobDeleted as exc:
        return error(410, str(exc), id=job.id)
    except JobFailed as exc:
        return error(502, exc.error or str(exc), id=job.id, state="fail")
    return {"id": response.id, "name": response.job_name, "state": response.state,
            "result": response.result}


@api.get("/jobs/{job_id}")
async def get_job(job_id: str) -> dict[str, Any]:
    """The job's record (404 once it is deleted, or purged after it finished)."""
    return (await kq.aget(job_id)).to_dict()


@api.delete("/jobs/{job_id}", status_code=204)
async def delete_job(job_id: str) -> Response:
    """Delete a job: queued or delayed, it never runs; a waiting request gets 410."""
    if not await kq.adelete(job_id):
        return error(404, f"no job {job_id!r}")
    return Response(status_code=204)


@api.get("/stats")
async def stats(name: str | None = None) -> dict[str, Any]:
    """Counts and timings per job name and in total (of one name with ``?name=``)."""
    return (await kq.astats(name)).to_dict()
