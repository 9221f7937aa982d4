"""Selection algorithms: pure tensor functions (scores, features, grids, budget -> sorted kept indices)."""
