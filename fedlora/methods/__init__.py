"""Methods as plug-ins: each public module here declares one method (its config section and its
:class:`~fedlora.extensions.Extension`) and is found by :func:`fedlora.registry.plugin_extensions`;
nothing else in fedlora names it. A declaration imports neither torch nor Flower (the config reads
it); the method's torch part lives in a private module (``_<name>.py``) its hooks import.
Third-party packages add methods the same way through the entry-point group ``fedlora.methods``.
"""
