"""Commands built on the stages and the runtime: watch, export, identify, simulate."""
