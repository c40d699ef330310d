"""Where the models run and how they share memory: devices and dtypes, memory modes, placement, compile."""
