"""Device models: plain classes with ``read(offset, size)`` / ``write(offset, data)`` for a Bus."""
