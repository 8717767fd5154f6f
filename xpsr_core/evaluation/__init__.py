"""Evaluation: pairs, the compared methods, scoring with every metric, and the comparison report.

``pairs`` loads LR/HR pairs; ``methods`` describes XPSR, its ablations, baselines and outside
results; ``baselines`` implements bicubic and Real-ESRGAN; ``compare`` runs every method on every
pair and scores it; ``report`` writes the metrics x methods table, per-image values and grids.
"""
