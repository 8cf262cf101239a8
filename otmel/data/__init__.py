"""Datasets: training pairs, synthetic KBs/mentions/posts, MIMIC/MELBench import, and the Arrow
schemas of the data contracts. Imports ``otmel.model`` and ``otmel.io``, never linking or jobs."""
