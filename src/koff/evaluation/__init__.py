"""Evaluation: perplexity and the swap matrix, general-ability tasks, lm-evaluation-harness,
generation."""
