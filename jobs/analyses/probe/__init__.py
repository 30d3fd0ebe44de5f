"""The probe job kind (Tables 4, 5, 7): linear classifiers on each layer's frozen features."""
