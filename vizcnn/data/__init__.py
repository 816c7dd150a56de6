"""Data: image files and arrays in, RGB tensors out; the procedural shapes data set."""
