"""The atlas job kind: every channel's top-k images over a dataset, projected with the deconvnet.

Spec :mod:`.spec`, tables :mod:`.tables`, the work :mod:`.scanner`, the Ray driver :mod:`.driver`.
"""
