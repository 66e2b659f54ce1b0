"""glmc graph passes: one pass per file, file name = function name.

The order in which they run is declared once, in glmc/pipeline.py.
"""
