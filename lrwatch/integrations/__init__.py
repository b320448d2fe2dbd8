"""Callbacks for training frameworks: PyTorch Lightning and Hugging Face Transformers.

Public as ``lrwatch.lightning`` and ``lrwatch.hf``; these modules import their framework, so
they load only when asked for.
"""
