"""Peers: NVIDIA kvpress presses side by side with Token Filtering at equal KV held.

kvpress pins ``transformers<5.3`` while this project runs a newer one, so the presses run in a venv of their own
(:mod:`tokenfilter.peers.env`), through a script (``peer_script.py``) that reads the inputs our harness built
(:mod:`tokenfilter.peers.inputs`) and writes JSON that :mod:`tokenfilter.peers.merge` joins with our results.
"""
