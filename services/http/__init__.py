"""What both HTTP servers (the query API, the scheduler) share: one settings class, the bearer
token and loopback rules, and request-body limits."""
