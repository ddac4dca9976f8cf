"""Views that create a kickq job and report on it."""

from __future__ import annotations

import json

from django.db import IntegrityError, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from kickq_celery import JobNotFound

from .models import Signup
from .tasks import kq


@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    """Sign a user up: the welcome email is a job, sent by a worker after the response.

    The signup is saved and the job asked for in one transaction: with ``on_commit=True`` the
    job is written when the transaction commits, so a worker never runs it for a signup that
    is not in the database yet, or that rolled back (here: the email signed up already).
    """
    body = json.loads(request.body or b"{}")
    email = body.get("email")
    if not isinstance(email, str) or "@" not in email:
        return JsonResponse({"error": "an email is required"}, status=400)
    try:
        with transaction.atomic():
            Signup.objects.create(email=email)
            job = kq.create("welcome_email", {"email": email, "fail_first": bool(body.get("fail_first"))},
                            on_commit=True)
    except IntegrityError:
        return JsonResponse({"error": f"{email} signed up already"}, status=409)
    return JsonResponse({"job_id": job.id, "state": job.state}, status=202)


@require_GET
def job_status(request: HttpRequest, job_id: str) -> JsonResponse:
    """The job's record, as JSON."""
    try:
        record = kq.get(job_id)
    except JobNotFound:
        return JsonResponse({"error": "no such job"}, status=404)
    return JsonResponse(record.to_dict())
