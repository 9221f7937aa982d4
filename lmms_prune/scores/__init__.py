"""Importance scores: pure tensor functions of attention maps and priors."""
