"""Speed: layer latency and decode speed of the storage formats (:mod:`.latency`), the roofline model
(:mod:`.roofline`), and the whitening-damping study (:mod:`.damping`)."""
