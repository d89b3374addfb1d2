"""Pretrained checkpoints: readers, converters into tljax trees, strict loading."""
