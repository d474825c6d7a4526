"""Files in and out: reading and writing images, atomic writes."""
