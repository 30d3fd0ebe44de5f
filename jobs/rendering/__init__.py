"""Drawing what jobs write: images of projections and tiles (:mod:`.images`), matplotlib figures
(:mod:`.plots`)."""
