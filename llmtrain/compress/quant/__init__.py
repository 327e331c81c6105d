"""Quantisation: the integer grid (grid.py) shared by post-training quantisation, quantisation-aware
training and the exporters, so a weight quantised by any of them lands on the same integers."""
