"""AIBox worker runtime: plain Python, no Django.

Code here runs on worker machines that reach only Redis and the artifact store. It
gets everything it needs in a task's arguments (artifact sha256 and location,
parameters) and reports back through Redis; it never imports Django or touches the
database. See docs/ARCHITECTURE in shared/ and ``apps/*/tasks.py`` for the bridges.
"""
