"""A model behind an OpenAI-compatible server: `client` (one server, retries, one-line faults), `backend` (rows,
generation, the probe before any work) and `serving` (cost as a client sees it, under concurrency)."""
