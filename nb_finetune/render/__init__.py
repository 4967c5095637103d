"""Figures and HTML: pure functions, data in, a matplotlib Figure or an HTML string out. Used
by the front ends and by the engine's objects for their rich display; imports no stage."""
