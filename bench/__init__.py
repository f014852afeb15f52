"""Benchmark suite: ``fused_rnn.LSTM`` / ``fused_rnn.GRU`` against ``torch.nn.LSTM`` / ``nn.GRU`` (cuDNN).

``python -m bench --help`` lists the options; ``bench.suite`` holds the importable pieces (config
grids, the agreement check, timing, the result rows, the JSON file and the plot).
docs/performance.md explains the grid, the targets and how to read the results.
"""
