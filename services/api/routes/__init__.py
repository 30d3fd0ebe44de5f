"""One router module per resource: runs, atlases (features), diffs, images."""
