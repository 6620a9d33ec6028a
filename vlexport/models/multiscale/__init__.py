"""multiscale."""
