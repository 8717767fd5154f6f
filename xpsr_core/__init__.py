"""xpsr_core: the XPSR library (data formats, degradations, models, training, inference).

The library never imports the CLI or the stage modules; stages compose it.
"""

__version__ = "0.1.0"
