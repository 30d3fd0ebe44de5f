"""The nightly scheduler: cron schedules of job specs, submitted exactly once per scheduled time
through the Ray Jobs API, with state in SQLite. ``zfatlas scheduler serve`` runs it;
``zfatlas schedule ...`` and the HTTP router in :mod:`services.scheduler.http` manage schedules."""
