"""Command-line tools, each `python -m learner.tools.<name>`; none of them imports Ray.

    pretrain   pre-train the shapes-world models (tiny policy, learned reward) and table the base policy
    eval       evaluate a run's checkpoint (or the base) on held-out prompts, optionally hybrid
    export     write a checkpoint's weights in the model family's native format
    diagnose   gradient signal-to-noise of the GRPO policy gradient per reward
    report     (re)write a run's report.md
    digest     statistics and weight hash of a short in-process run: is a change bitwise neutral?
"""
