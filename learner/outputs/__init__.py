"""What a run writes, besides checkpoints: metrics.jsonl and progress lines (metrics.py), the observers the
loop feeds (observers.py: Ray dashboard metrics, TensorBoard, the report at the end), sample grids
(grids.py) and the run report (report.py). No Ray here: the metrics observer is a no-op without a session.
"""
