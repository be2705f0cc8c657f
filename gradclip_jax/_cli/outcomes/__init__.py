"""``gradclip-jax outcomes``: clipping policies judged on real training runs.

- ``tasks.py``: the training tasks (a byte-level transformer LM in Flax NNX, a byte-level LSTM
  LM, a vanilla tanh RNN on the adding problem) and the scenarios cut from them;
- ``baselines.py``: published adaptive rules written from their papers (AutoClip, ZClip),
  used as baselines only, not library API;
- ``harness.py``: paired runs (same initialisation and batches for every policy), vmapped over
  (policy variant, learning rate, seed, scenario), and the metrics;
- ``report.py``: the Markdown table, JSON and PNG plots.
"""
