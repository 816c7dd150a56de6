"""Data: image files and arrays in, RGB tensors out; the procedural shapes data set; and the
layout of a folder of concept masks (plain text here, so that the command line's help needs
no heavy import)."""

__all__ = ["MASKS_LAYOUT"]

MASKS_LAYOUT = """\
photos/                 photos-masks/
  beach/0001.jpg          concepts.txt       one concept name per line: line 1 is value 0
  beach/0002.jpg          beach/0001.png     grayscale (8 or 16 bit) or palette PNG at the
  street/0001.jpg         beach/0002.png     image's size, each pixel the index of the
                          street/0001.png    concept it shows"""
