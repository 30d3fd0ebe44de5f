"""The invariance job kind (Fig. 5): feature distances and class probability under shifts, scales and
rotations."""
