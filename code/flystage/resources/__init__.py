"""Data files shipped with flystage."""
