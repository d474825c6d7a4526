"""Leaf modules every layer may import, none of them heavy: errors, value and text checks, digests, paths."""
