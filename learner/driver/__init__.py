"""The driver: builds each role from the config, turns roles into Ray actors, and runs the loop.

    build.py      plain constructors from config sections (no Ray): tools and tests build roles here
    actors.py     the one module that applies `ray.remote`, with explicit actor methods
    loop.py       run_loop: the iterations, evaluation, checkpoints, resume (the only `.remote()` caller,
    rollouts.py   with its rollout / weight-broadcast helpers and their fault handling)
    inprocess.py  run_inprocess: the same run without Ray, the reference a distributed run reproduces

Importing this package imports no Ray; `learner.driver.loop` and `learner.driver.actors` do.
"""
