"""Continued pretraining of the new parameters only (issue: train). Nothing here yet."""
