"""What both HTTP servers (the query API, the scheduler) share: one settings class, the bearer
token and loopback rules, request-body limits, and the guards every server is built with (Host
header check, security headers: ``guards.py``)."""
