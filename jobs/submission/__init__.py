"""Sending specs to a Ray cluster: the Jobs API client (:mod:`.ray_jobs`) and submission
(:mod:`.submit`)."""
