"""The runtime: the pipeline that chains the stages and the tasks that drive it."""
