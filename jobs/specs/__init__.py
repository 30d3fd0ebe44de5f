"""Job specs: the fields every kind shares (:mod:`jobs.specs.base`), reading spec files
(:mod:`jobs.specs.loading`) and what a job kind is (:mod:`jobs.specs.kind`)."""
