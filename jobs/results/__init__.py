"""Reading what jobs wrote: queries on committed atlases (:mod:`.query`) and diffs of two
(:mod:`.diff`). No Ray here."""
