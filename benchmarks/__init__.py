"""kickq_celery benchmarks against raw Celery, measured in the same run (`make bench`)."""
