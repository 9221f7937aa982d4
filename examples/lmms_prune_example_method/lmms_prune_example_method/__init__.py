"""An external lmms-prune method living outside the package: ``gridtopk`` (see method.py)."""
