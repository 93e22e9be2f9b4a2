"""fedlora's client side (installed as ``fedlora.clients``)."""
