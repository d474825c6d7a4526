"""icd: text-guided editing of real photos with invertible Consistency Distillation."""

__version__ = "0.1.0"
