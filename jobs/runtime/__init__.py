"""Where jobs run: connecting to Ray and sizing actors (:mod:`.cluster`), running work on actors
that may die (:mod:`.actors`), and the device an actor computes on (:mod:`.device`, no Ray)."""
