"""planc: compile a model, a GPU inventory and a workload into a locked deployment plan."""

__version__ = "0.1.0"
