"""The zfatlas HTTP API and web atlas viewer (FastAPI). Build it with :func:`create_app`."""
