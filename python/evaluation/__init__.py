"""Scoring generators with torch: the generator of a weights folder, reference renders, diversity and fidelity."""
