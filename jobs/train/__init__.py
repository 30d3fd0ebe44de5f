"""The train job kind: a network trained with the paper's recipe on Ray Train, resumable.

Spec :mod:`.spec`; the Ray driver :mod:`.driver`; what each worker runs :mod:`.worker`, built from
the plain step :mod:`.step`, its data :mod:`.data`, metrics :mod:`.metrics`, learning-rate schedule
:mod:`.schedule`, checkpoints :mod:`.checkpoints` and feature evolution :mod:`.evolution`.
"""
