"""fedlora's server side (installed as ``fedlora.server``)."""
