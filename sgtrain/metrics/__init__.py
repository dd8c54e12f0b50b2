"""Evaluation metrics: pure statistics on feature arrays (``stats``); extractors and evaluation live beside them."""
