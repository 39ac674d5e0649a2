"""Measuring models on the shapes dataset: judge.py (the independent judge of shapes images,
which knows only the contract of docs/shapes.md), report.py (fidelity, CLIP retrieval, VAE
reconstruction, unCLIP variations and text diffs, best-of-N: `nanodiffusion eval`)."""
