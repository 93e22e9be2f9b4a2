"""Real federations on Flower's deployment runtime (SuperLink, SuperNodes): keys and certificates,
the processes `fedlora server` and `fedlora client` start, and the resident executor that keeps a
client's base model loaded between rounds. Flower's own transport carries every message."""
