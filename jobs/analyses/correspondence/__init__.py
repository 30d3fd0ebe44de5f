"""The correspondence job kind (Table 1): the same part masked in several images, compared."""
