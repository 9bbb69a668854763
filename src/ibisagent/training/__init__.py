"""Training code: the segmenter click fine-tune (more trainers live here)."""
