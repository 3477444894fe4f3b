"""Evaluation: perplexity, function preservation, reports (issue: eval). Nothing here yet."""
