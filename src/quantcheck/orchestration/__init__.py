"""Running a comparison: the runner plans the jobs, the launcher starts one isolated worker process per
model and phase (optimum-benchmark's process launcher), the worker runs it through a backend, and
progress turns the workers' events into what the user sees."""
