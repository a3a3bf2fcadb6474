"""flystage: stage Drosophila embryo images, from lab folders to a served top-3 classifier."""

__version__ = "0.1.0"
